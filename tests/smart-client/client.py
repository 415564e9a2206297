#!/usr/bin/env python3
"""A third-party SMART on FHIR client (the `fhirclient` package) against the gateway, for the e2e suite.

    client.py BASE_URL PATIENT_ID SEARCH_TYPE PAGE_SIZE      (bearer token in $FHIR_TOKEN)

Discovers the server the way fhirclient does (GET metadata, parsed with its own R4 models, SMART oauth-uris
extension read into its auth settings) and also reads .well-known/smart-configuration; then, with the token,
reads one Patient (a 404 is reported, not raised) and runs a search following every `next` link (fhirclient's own
paging). Prints one JSON object on stdout; any other failure is an exception and a non-zero exit.
"""

import json
import os
import sys

from fhirclient import client
from fhirclient.auth import FHIROAuth2Auth
from fhirclient.models.fhirelementfactory import FHIRElementFactory
from fhirclient.models.patient import Patient
from fhirclient.server import FHIRNotFoundException

OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"


def references(value):
    """Every Reference.reference string in a resource's JSON."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "reference" and isinstance(item, str):
                yield item
            else:
                yield from references(item)
    elif isinstance(value, list):
        for item in value:
            yield from references(item)


def main():
    base, patient_id, search_type, page_size = sys.argv[1:5]
    token = os.environ["FHIR_TOKEN"]
    smart = client.FHIRClient(settings={"app_id": "fhirgw-e2e", "api_base": base})
    server = smart.server

    # Discovery: fhirclient fetches and parses the CapabilityStatement itself (no token needed).
    server.get_capability()
    cs = server.capabilityStatement
    security = cs.rest[0].security
    oauth_uris = {
        inner.url: inner.valueUri
        for ext in (security.extension or [])
        if ext.url == OAUTH_URIS
        for inner in (ext.extension or [])
    }
    discovered = {
        "fhirVersion": cs.fhirVersion,
        "implementation_url": cs.implementation.url if cs.implementation else None,
        "oauth_uris": oauth_uris,
        "security_service": [c.code for s in (security.service or []) for c in (s.coding or [])],
        "resource_types": sorted(r.type for r in (cs.rest[0].resource or [])),
    }
    well_known = server.session.get(base.rstrip("/") + "/.well-known/smart-configuration", timeout=30)
    well_known.raise_for_status()
    discovered["smart_configuration"] = well_known.json()

    # A token obtained out of band (client credentials at the issuer): fhirclient's OAuth2 auth signs every request.
    server.auth = FHIROAuth2Auth(state={"app_id": "fhirgw-e2e", "access_token": token})

    try:
        patient = Patient.read(patient_id, server)
        patient_out = {"id": patient.id, "family": patient.name[0].family if patient.name else None}
    except FHIRNotFoundException:
        patient_out = {"not_found": patient_id}
    model = type(FHIRElementFactory.instantiate(search_type, None))
    pages = []
    for bundle in model.where({"_count": page_size}).perform_iter(server):
        pages.append(
            {
                "links": {link.relation: link.url for link in (bundle.link or [])},
                "full_urls": [e.fullUrl for e in (bundle.entry or [])],
                "ids": [e.resource.id for e in (bundle.entry or []) if e.resource],
                "references": sorted(
                    {ref for e in (bundle.entry or []) if e.resource for ref in references(e.resource.as_json())}
                ),
            }
        )
    print(
        json.dumps(
            {
                "discovered": discovered,
                "patient": patient_out,
                "pages": pages,
            }
        )
    )


if __name__ == "__main__":
    main()

//! Who may call what on the gRPC port, from the connection's client certificate and the request's bearer token.
//!
//! - **Config stream** ([`DataPlaneAuth`]): with `--dataplane-ca-file`, a client certificate issued by that CA and
//!   carrying a URI or DNS SAN (the data plane's identity, shown in `GetStatus`); with `--dataplane-token-file`,
//!   the shared token; with both, both.
//! - **Admin API** ([`AdminGate`]): never a data-plane certificate (refused with PERMISSION_DENIED whatever token
//!   comes with it); with `--operator-ca-file`, a certificate from that CA; then the operator's bearer token
//!   (`operators`), which names the actor in the audit trail.
//!
//! The data-plane and operator CAs must be distinct (checked when they are loaded), so no certificate holds both
//! roles.

use tonic::service::Interceptor;
use tonic::{Request, Status};
use tracing::warn;

use crate::auth::BearerAuth;
use crate::operators::OperatorAuth;
use crate::transport::{DATAPLANE, OPERATOR, PeerInfo};

/// The data plane's identity from its certificate, put in the request's extensions for the config stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataPlaneIdentity(pub String);

#[derive(Clone)]
pub struct DataPlaneAuth {
    token: Option<BearerAuth>,
    require_cert: bool,
}

impl DataPlaneAuth {
    /// At least one of the two must be required.
    pub fn new(token: Option<BearerAuth>, require_cert: bool) -> anyhow::Result<Self> {
        if token.is_none() && !require_cert {
            anyhow::bail!(
                "no data-plane credentials: pass --dataplane-ca-file (mutual TLS) or --dataplane-token-file / FHIRGW_DATAPLANE_TOKEN"
            );
        }
        Ok(DataPlaneAuth { token, require_cert })
    }

    fn identity(&self, peer: Option<&PeerInfo>) -> Result<Option<DataPlaneIdentity>, Status> {
        if !self.require_cert {
            return Ok(None);
        }
        let remote = peer.map(|p| p.remote.to_string()).unwrap_or_default();
        let refuse = |status: Status| {
            warn!(%remote, reason = %status.message(), "config stream refused");
            Err(status)
        };
        match peer.and_then(|p| p.cert.as_ref()) {
            None => refuse(Status::unauthenticated(
                "a data-plane client certificate is required (mutual TLS); none was presented",
            )),
            Some(cert) if !cert.has_role(DATAPLANE) => {
                refuse(Status::permission_denied("the client certificate is not issued by the data-plane CA"))
            }
            Some(cert) => match &cert.identity {
                Some(id) => Ok(Some(DataPlaneIdentity(id.clone()))),
                None => refuse(Status::unauthenticated(
                    "the data-plane certificate carries no URI or DNS subject alternative name to identify it by",
                )),
            },
        }
    }
}

impl Interceptor for DataPlaneAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let identity = self.identity(PeerInfo::of(&request))?;
        if let Some(token) = &self.token {
            token.check(request.metadata().get("authorization").map(|v| v.as_bytes()))?;
        }
        if let Some(identity) = identity {
            request.extensions_mut().insert(identity);
        }
        Ok(request)
    }
}

#[derive(Clone)]
pub struct AdminGate {
    operators: OperatorAuth,
    require_operator_cert: bool,
}

impl AdminGate {
    pub fn new(operators: OperatorAuth, require_operator_cert: bool) -> Self {
        AdminGate { operators, require_operator_cert }
    }

    fn check_certificate(&self, peer: Option<&PeerInfo>) -> Result<(), Status> {
        let Some(peer) = peer else {
            return if self.require_operator_cert {
                Err(Status::unauthenticated("an operator client certificate is required"))
            } else {
                Ok(())
            };
        };
        if peer.has_role(DATAPLANE) {
            let identity = peer.cert.as_ref().and_then(|c| c.identity.clone()).unwrap_or_default();
            warn!(remote = %peer.remote, %identity, "refused an admin call made with a data-plane certificate");
            return Err(Status::permission_denied("a data-plane certificate cannot call the admin API"));
        }
        if self.require_operator_cert && !peer.has_role(OPERATOR) {
            warn!(remote = %peer.remote, "refused an admin call without an operator certificate");
            return Err(Status::unauthenticated(
                "an operator client certificate (issued by the operator CA) is required, with the operator's bearer token",
            ));
        }
        Ok(())
    }
}

impl Interceptor for AdminGate {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.check_certificate(PeerInfo::of(&request))?;
        self.operators.call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fhirgw_tls::server::PeerCert;

    fn peer(roles: &[&'static str], identity: Option<&str>) -> PeerInfo {
        PeerInfo {
            remote: "127.0.0.1:1".parse().unwrap_or_else(|e| panic!("{e}")),
            cert: (!roles.is_empty() || identity.is_some())
                .then(|| PeerCert { roles: roles.to_vec(), identity: identity.map(str::to_owned) }),
        }
    }

    #[test]
    fn certificates_decide_roles() {
        let token = BearerAuth::new("dataplane-token-0123456789", "data plane").unwrap_or_else(|e| panic!("{e}"));
        let mtls = DataPlaneAuth::new(None, true).unwrap_or_else(|e| panic!("{e}"));
        let code = |r: Result<Option<DataPlaneIdentity>, Status>| r.map_err(|s| s.code());
        assert_eq!(
            code(mtls.identity(Some(&peer(&[DATAPLANE], Some("spiffe://x/dp"))))),
            Ok(Some(DataPlaneIdentity("spiffe://x/dp".into())))
        );
        assert_eq!(code(mtls.identity(Some(&peer(&[], None))),), Err(tonic::Code::Unauthenticated));
        assert_eq!(code(mtls.identity(Some(&peer(&[OPERATOR], Some("alice"))))), Err(tonic::Code::PermissionDenied));
        assert_eq!(code(mtls.identity(Some(&peer(&[DATAPLANE], None))),), Err(tonic::Code::Unauthenticated));
        assert_eq!(code(mtls.identity(None)), Err(tonic::Code::Unauthenticated));
        let tokens = DataPlaneAuth::new(Some(token), false).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(code(tokens.identity(Some(&peer(&[], None)))), Ok(None));
        assert!(DataPlaneAuth::new(None, false).is_err());

        let single = BearerAuth::new("operator-token-0123456789", "operator").unwrap_or_else(|e| panic!("{e}"));
        let operators = OperatorAuth::new(Some(single), None).unwrap_or_else(|e| panic!("{e}"));
        let open = AdminGate::new(operators.clone(), false);
        let strict = AdminGate::new(operators, true);
        let code = |r: Result<(), Status>| r.map_err(|s| s.code());
        for gate in [&open, &strict] {
            assert_eq!(
                code(gate.check_certificate(Some(&peer(&[DATAPLANE], Some("dp"))))),
                Err(tonic::Code::PermissionDenied)
            );
        }
        assert_eq!(code(open.check_certificate(Some(&peer(&[], None)))), Ok(()));
        assert_eq!(code(strict.check_certificate(Some(&peer(&[], None)))), Err(tonic::Code::Unauthenticated));
        assert_eq!(code(strict.check_certificate(Some(&peer(&[OPERATOR], Some("alice"))))), Ok(()));
    }
}

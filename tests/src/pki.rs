//! Certificates made in the test with rcgen: CAs, server and client certificates (valid, expired, from another
//! CA), written as PEM files the binaries read, and rewritten in place to rotate them.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, Ia5String, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A certificate authority.
pub struct Ca {
    pub name: String,
    cert: Certificate,
    key: KeyPair,
}

/// A certificate and key as PEM files.
#[derive(Debug, Clone)]
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The certificate (DER), to compare with what a server presents.
    pub der: Vec<u8>,
}

impl Pair {
    pub fn cert_str(&self) -> String {
        self.cert.display().to_string()
    }

    pub fn key_str(&self) -> String {
        self.key.display().to_string()
    }
}

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
}

/// Validity of an issued certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// Now until far in the future.
    Current,
    /// 2020-01-01 to 2021-01-01.
    Expired,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        Ca { name: name.to_owned(), cert, key }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// Writes the CA certificate to `dir/<file>`; returns the path.
    pub fn write(&self, dir: &Path, file: &str) -> PathBuf {
        let path = dir.join(file);
        std::fs::write(&path, self.pem()).unwrap();
        path
    }

    /// Issues a certificate for `names` (DNS names and IP addresses; `spiffe://…` and other URIs become URI SANs),
    /// written to `dir/<stem>.pem` and `dir/<stem>.key` (overwriting them: that is how a test rotates).
    pub fn issue(&self, dir: &Path, stem: &str, names: &[&str], usage: Usage, validity: Validity) -> Pair {
        let key = KeyPair::generate().unwrap();
        let (uris, others): (Vec<&str>, Vec<&str>) = names.iter().partition(|n| n.contains("://"));
        let mut params = CertificateParams::new(others.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
        for uri in uris {
            params.subject_alt_names.push(SanType::URI(Ia5String::try_from(uri).unwrap()));
        }
        params.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or(stem));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![match usage {
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        if validity == Validity::Expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let pair = Pair {
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}.key")),
            der: cert.der().to_vec(),
        };
        // Each file replaced whole (as Kubernetes swaps a Secret volume's files); key first, then the certificate: a
        // reader between the two sees a mismatch, refuses it, and takes the pair on its next look.
        replace(&pair.key, &key.serialize_pem());
        replace(&pair.cert, &(cert.pem() + &self.pem()));
        pair
    }
}

fn replace(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

//! The last good snapshot on local disk, so a data plane started while the control plane is away can serve.
//! Written atomically (temporary file, fsync, rename, fsync of the directory); read back through the same validation
//! as a push.
//!
//! File format: [`MAGIC`], then the SHA-256 of the rest, then a `SnapshotFile` message. A protobuf message has no
//! end marker, so a file cut on a record boundary (or empty) would otherwise decode as a smaller, valid
//! configuration: the digest is what tells a whole file from a cut one. A file without the header (written by an
//! older version), with a digest that does not match, or holding no route table is refused and never served.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use fhirgw_config::resource::{from_wire, to_wire};
use fhirgw_config::tenant::{system_to_timestamp, timestamp_to_system};
use fhirgw_config::{ResourceSet, Snapshot};
use fhirgw_proto::push::v1 as push;
use prost::Message;
use sha2::{Digest, Sha256};

const FILE: &str = "snapshot.pb";
/// The first bytes of a snapshot file: a name and a format version.
pub const MAGIC: &[u8; 8] = b"FHIRGWS\x02";
/// Magic and digest: where the `SnapshotFile` message starts.
pub const HEADER_LEN: usize = MAGIC.len() + 32;

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a snapshot file: {source}")]
    Decode {
        path: PathBuf,
        #[source]
        source: prost::DecodeError,
    },
    #[error("{path}: holds an invalid configuration: {reasons}")]
    Invalid { path: PathBuf, reasons: String },
    #[error("{path}: not a snapshot file of this version (no header; {len} bytes)")]
    NoHeader { path: PathBuf, len: usize },
    #[error("{path}: the content does not match its digest (cut short or corrupted)")]
    DigestMismatch { path: PathBuf },
    #[error("{path}: holds an empty configuration (no route table), which is never a last good one")]
    Empty { path: PathBuf },
}

#[derive(Debug, Clone)]
pub struct SnapshotDir {
    dir: PathBuf,
}

pub struct Loaded {
    pub snapshot: Snapshot,
    pub confirmed_at: Option<SystemTime>,
    /// The store the configuration came from ("" when unknown).
    pub store_id: String,
}

/// The bytes of a snapshot file holding `message`.
pub fn encode_file(message: &push::SnapshotFile) -> Vec<u8> {
    let payload = message.encode_to_vec();
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&Sha256::digest(&payload));
    out.extend_from_slice(&payload);
    out
}

/// The message in a snapshot file's bytes, once its header and digest check out.
fn decode_file(path: &Path, bytes: &[u8]) -> Result<push::SnapshotFile, PersistError> {
    if bytes.len() < HEADER_LEN || &bytes[..MAGIC.len()] != MAGIC {
        return Err(PersistError::NoHeader { path: path.to_owned(), len: bytes.len() });
    }
    let (digest, payload) = bytes[MAGIC.len()..].split_at(32);
    if Sha256::digest(payload).as_slice() != digest {
        return Err(PersistError::DigestMismatch { path: path.to_owned() });
    }
    push::SnapshotFile::decode(payload).map_err(|source| PersistError::Decode { path: path.to_owned(), source })
}

impl SnapshotDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// Saves `snapshot` (from the store `store_id`) as the last good one. An empty configuration (no route table) is
    /// not saved, so it can never replace a real one on disk: returns `Ok(false)`. Blocking: call from
    /// `spawn_blocking`.
    pub fn save(&self, snapshot: &Snapshot, confirmed_at: SystemTime, store_id: &str) -> Result<bool, PersistError> {
        if snapshot.tables.is_empty() {
            return Ok(false);
        }
        let file = push::SnapshotFile {
            resources: to_wire(&snapshot.resources),
            system_version: snapshot.system_version,
            saved_at: Some(system_to_timestamp(SystemTime::now())),
            confirmed_at: Some(system_to_timestamp(confirmed_at)),
            store_id: store_id.to_owned(),
        };
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| PersistError::Io { path, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let tmp = self.dir.join(format!("{FILE}.tmp"));
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&encode_file(&file)).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        drop(f);
        let path = self.path();
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io(&self.dir))?;
        Ok(true)
    }

    /// `Ok(None)` when there is no snapshot yet.
    pub fn load(&self) -> Result<Option<Loaded>, PersistError> {
        let path = self.path();
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(PersistError::Io { path, source }),
        };
        let file = decode_file(&path, &bytes)?;
        let mut set = ResourceSet::new();
        let mut reasons = Vec::new();
        for resource in file.resources {
            match from_wire(resource) {
                Ok((key, raw)) => {
                    set.insert(key, raw);
                }
                Err(rejection) => reasons.push(rejection.to_string()),
            }
        }
        if !reasons.is_empty() {
            return Err(PersistError::Invalid { path, reasons: reasons.join("; ") });
        }
        let snapshot = Snapshot::build(set, file.system_version).map_err(|rejections| PersistError::Invalid {
            path: path.clone(),
            reasons: rejections.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
        })?;
        if snapshot.tables.is_empty() {
            return Err(PersistError::Empty { path });
        }
        Ok(Some(Loaded {
            snapshot,
            confirmed_at: file.confirmed_at.as_ref().and_then(timestamp_to_system),
            store_id: file.store_id,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fhirgw_config::{Kind, RawResource};
    use fhirgw_proto::config::v1 as pb;

    fn upstream() -> ((Kind, String), RawResource) {
        let upstream =
            pb::Upstream { name: "hapi".into(), base_url: "http://127.0.0.1:9/fhir".into(), ..Default::default() };
        ((Kind::Upstream, "hapi".to_owned()), RawResource::encode(Kind::Upstream, &upstream))
    }

    fn table() -> ((Kind, String), RawResource) {
        let route = pb::Route {
            id: "all".into(),
            path: "/**".into(),
            action: Some(pb::route::Action::Proxy(pb::ProxyAction { upstream: "hapi".into() })),
            ..Default::default()
        };
        let table = pb::RouteTable { name: "main".into(), base_path: "/fhir".into(), routes: vec![route] };
        ((Kind::RouteTable, "main".to_owned()), RawResource::encode(Kind::RouteTable, &table))
    }

    fn snapshot(with_table: bool) -> Snapshot {
        let mut set: ResourceSet = [upstream()].into();
        if with_table {
            set.extend([table()]);
        }
        Snapshot::build(set, 42).unwrap_or_else(|e| panic!("{e:?}"))
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = SnapshotDir::new(dir.path());
        assert!(store.load().unwrap_or_else(|e| panic!("{e}")).is_none());
        let snapshot = snapshot(true);
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        assert!(store.save(&snapshot, at, "store-1").unwrap_or_else(|e| panic!("{e}")));
        let loaded = store.load().unwrap_or_else(|e| panic!("{e}")).unwrap_or_else(|| panic!("missing"));
        assert_eq!(loaded.snapshot.digest, snapshot.digest);
        assert_eq!(loaded.snapshot.system_version, 42);
        assert_eq!(loaded.confirmed_at, Some(at));
        assert_eq!(loaded.store_id, "store-1");
    }

    #[test]
    fn an_empty_configuration_is_never_saved_nor_loaded() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = SnapshotDir::new(dir.path());
        let at = SystemTime::now();
        assert!(store.save(&snapshot(true), at, "s").unwrap_or_else(|e| panic!("{e}")));
        let before = std::fs::read(store.path()).unwrap_or_else(|e| panic!("{e}"));
        assert!(!store.save(&snapshot(false), at, "s").unwrap_or_else(|e| panic!("{e}")), "no route table: not saved");
        assert_eq!(std::fs::read(store.path()).unwrap_or_else(|e| panic!("{e}")), before, "the last good one stays");
        // Written by something else: refused on load.
        let file = push::SnapshotFile { resources: to_wire(&snapshot(false).resources), ..Default::default() };
        std::fs::write(store.path(), encode_file(&file)).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(store.load(), Err(PersistError::Empty { .. })));
    }

    #[test]
    fn damaged_files_are_refused() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = SnapshotDir::new(dir.path());
        store.save(&snapshot(true), SystemTime::now(), "s").unwrap_or_else(|e| panic!("{e}"));
        let whole = std::fs::read(store.path()).unwrap_or_else(|e| panic!("{e}"));
        let message = push::SnapshotFile::decode(&whole[HEADER_LEN..]).unwrap_or_else(|e| panic!("{e}"));
        // The offset just after the first resource record: a cut there still decodes as a valid message.
        let first = push::SnapshotFile { resources: message.resources[..1].to_vec(), ..Default::default() };
        let boundary = HEADER_LEN + first.encoded_len();
        let mut flipped = whole.clone();
        let middle = whole.len() / 2;
        flipped[middle] ^= 0x10;
        let mut flipped_digest = whole.clone();
        flipped_digest[MAGIC.len() + 3] ^= 0x01;
        let legacy = message.encode_to_vec();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", Vec::new()),
            ("header only", whole[..HEADER_LEN].to_vec()),
            ("cut on a record boundary", whole[..boundary].to_vec()),
            ("cut mid-record", whole[..boundary + 3].to_vec()),
            ("one byte short", whole[..whole.len() - 1].to_vec()),
            ("a bit flipped in the content", flipped),
            ("a bit flipped in the digest", flipped_digest),
            ("no header (older format)", legacy),
            ("garbage", b"\xff\xff garbage".to_vec()),
        ];
        for (what, bytes) in cases {
            std::fs::write(store.path(), &bytes).unwrap_or_else(|e| panic!("{e}"));
            assert!(store.load().is_err(), "{what}: must be refused");
        }
        std::fs::write(store.path(), &whole).unwrap_or_else(|e| panic!("{e}"));
        assert!(store.load().is_ok_and(|l| l.is_some()), "the whole file loads");
    }
}

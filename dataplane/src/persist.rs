//! The last good snapshot on local disk, so a data plane started while the control plane is away can serve.
//! Written atomically (temporary file, fsync, rename, fsync of the directory); read back through the same validation
//! as a push.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use fhirgw_config::resource::{from_wire, to_wire};
use fhirgw_config::tenant::{system_to_timestamp, timestamp_to_system};
use fhirgw_config::{ResourceSet, Snapshot};
use fhirgw_proto::push::v1 as push;
use prost::Message;

const FILE: &str = "snapshot.pb";

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
}

#[derive(Debug, Clone)]
pub struct SnapshotDir {
    dir: PathBuf,
}

pub struct Loaded {
    pub snapshot: Snapshot,
    pub confirmed_at: Option<SystemTime>,
}

impl SnapshotDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// Blocking: call from `spawn_blocking`.
    pub fn save(&self, snapshot: &Snapshot, confirmed_at: SystemTime) -> Result<(), PersistError> {
        let file = push::SnapshotFile {
            resources: to_wire(&snapshot.resources),
            system_version: snapshot.system_version,
            saved_at: Some(system_to_timestamp(SystemTime::now())),
            confirmed_at: Some(system_to_timestamp(confirmed_at)),
            ..Default::default()
        };
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| PersistError::Io { path, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let tmp = self.dir.join(format!("{FILE}.tmp"));
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&file.encode_to_vec()).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        drop(f);
        let path = self.path();
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io(&self.dir))?;
        Ok(())
    }

    /// `Ok(None)` when there is no snapshot yet.
    pub fn load(&self) -> Result<Option<Loaded>, PersistError> {
        let path = self.path();
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(PersistError::Io { path, source }),
        };
        let file = push::SnapshotFile::decode(bytes.as_slice())
            .map_err(|source| PersistError::Decode { path: path.clone(), source })?;
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
        Ok(Some(Loaded { snapshot, confirmed_at: file.confirmed_at.as_ref().and_then(timestamp_to_system) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fhirgw_config::{Kind, RawResource};
    use fhirgw_proto::config::v1 as pb;

    #[test]
    fn round_trip_and_corruption() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = SnapshotDir::new(dir.path());
        assert!(store.load().unwrap_or_else(|e| panic!("{e}")).is_none());
        let upstream =
            pb::Upstream { name: "hapi".into(), base_url: "http://127.0.0.1:9/fhir".into(), ..Default::default() };
        let set: ResourceSet =
            [((Kind::Upstream, "hapi".to_owned()), RawResource::encode(Kind::Upstream, &upstream))].into();
        let snapshot = Snapshot::build(set, 42).unwrap_or_else(|e| panic!("{e:?}"));
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        store.save(&snapshot, at).unwrap_or_else(|e| panic!("{e}"));
        let loaded = store.load().unwrap_or_else(|e| panic!("{e}")).unwrap_or_else(|| panic!("missing"));
        assert_eq!(loaded.snapshot.digest, snapshot.digest);
        assert_eq!(loaded.snapshot.system_version, 42);
        assert_eq!(loaded.confirmed_at, Some(at));

        std::fs::write(store.path(), b"\xff\xff garbage").unwrap_or_else(|e| panic!("{e}"));
        assert!(store.load().is_err());
    }
}

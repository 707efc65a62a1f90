//! The local-folder state store, the embedded default.
//!
//! Versions are content hashes; a write compares the current file's hash with the one the
//! writer read, then writes a temporary file and renames it over the old one, so a crash
//! never leaves half a file. The lock is an OS file lock (`flock`) on `lock` in the folder:
//! the OS drops it when the process dies, so a crash never leaves the folder locked.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use sha2::{Digest, Sha256};

use super::{Lock, Precondition, StateError, StateStore, Version, Versioned};

pub struct FileStore {
    dir: PathBuf,
}

impl FileStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FileStore { dir: dir.into() }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn ensure_dir(&self) -> Result<(), StateError> {
        fs::create_dir_all(&self.dir).map_err(|e| unavailable(&self.dir, e))
    }
}

fn unavailable(path: &Path, e: std::io::Error) -> StateError {
    StateError::Unavailable(format!("{}: {e}", path.display()))
}

fn version_of(bytes: &[u8]) -> Version {
    let d = Sha256::digest(bytes);
    Version(d.iter().take(16).map(|b| format!("{b:02x}")).collect())
}

struct FileLock {
    _file: File,
}

#[async_trait]
impl Lock for FileLock {
    async fn renew(&self) -> Result<(), StateError> {
        Ok(())
    }
    async fn release(self: Box<Self>) -> Result<(), StateError> {
        // Dropping the file unlocks it.
        Ok(())
    }
}

#[async_trait]
impl StateStore for FileStore {
    fn describe(&self) -> String {
        format!("folder {}", self.dir.display())
    }

    async fn read(&self, name: &str) -> Result<Option<Versioned>, StateError> {
        let path = self.path(name);
        match fs::read(&path) {
            Ok(bytes) => {
                let version = version_of(&bytes);
                Ok(Some(Versioned { bytes, version }))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(unavailable(&path, e)),
        }
    }

    async fn write(
        &self,
        name: &str,
        bytes: &[u8],
        condition: Precondition,
    ) -> Result<Version, StateError> {
        self.ensure_dir()?;
        let current = self.read(name).await?;
        let ok = match (&condition, &current) {
            (Precondition::Absent, None) => true,
            (Precondition::Matches(v), Some(cur)) => *v == cur.version,
            _ => false,
        };
        if !ok {
            return Err(StateError::Conflict { name: name.into() });
        }
        let path = self.path(name);
        let tmp = self.path(&format!(".{name}.{}.tmp", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            unavailable(&path, e)
        })?;
        Ok(version_of(bytes))
    }

    async fn try_lock(&self) -> Result<Option<Box<dyn Lock>>, StateError> {
        self.ensure_dir()?;
        let path = self.path("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| unavailable(&path, e))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(Box::new(FileLock { _file: file }))),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => Err(unavailable(&path, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn conditional_writes_refuse_stale_versions() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::new(dir.path().join("state"));
        assert!(s.read("x").await.unwrap().is_none());
        let v1 = s.write("x", b"one", Precondition::Absent).await.unwrap();
        assert!(matches!(
            s.write("x", b"again", Precondition::Absent).await,
            Err(StateError::Conflict { .. })
        ));
        let v2 = s
            .write("x", b"two", Precondition::Matches(v1.clone()))
            .await
            .unwrap();
        assert!(matches!(
            s.write("x", b"stale", Precondition::Matches(v1)).await,
            Err(StateError::Conflict { .. })
        ));
        let read = s.read("x").await.unwrap().unwrap();
        assert_eq!((read.bytes.as_slice(), read.version), (&b"two"[..], v2));
    }

    #[tokio::test]
    async fn the_lock_is_exclusive_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let a = FileStore::new(dir.path());
        let b = FileStore::new(dir.path());
        let held = a.try_lock().await.unwrap().expect("first lock");
        assert!(b.try_lock().await.unwrap().is_none());
        held.release().await.unwrap();
        assert!(b.try_lock().await.unwrap().is_some());
    }
}

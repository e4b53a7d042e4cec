//! The conformance suite and white-box tests for `FileStorage`.

use std::sync::Arc;

use tempfile::TempDir;

use super::FileStorage;
use crate::conformance::Harness;
use crate::storage::Storage;

/// One store directory: `store()` is one shared handle, `reopen()` a new one on the same
/// directory, as another process would open it.
struct Files {
    dir: TempDir,
    store: Arc<FileStorage>,
}

impl Files {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Arc::new(FileStorage::open(dir.path().join("store")).expect("open"));
        Self { dir, store }
    }
}

impl Harness for Files {
    fn store(&self) -> Arc<dyn Storage> {
        self.store.clone()
    }

    fn reopen(&self) -> Option<Arc<dyn Storage>> {
        let store = FileStorage::open(self.dir.path().join("store")).expect("reopen");
        Some(Arc::new(store))
    }
}

mod conformance {
    crate::storage_conformance!(super::Files::new(), durable);
}


//! `FileStorage`: the durable embedded default.

/// A store in a directory on local disk.
#[derive(Debug)]
pub struct FileStorage {}

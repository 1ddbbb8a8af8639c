//! A copy of the example manifests that a test may edit while a daemon watches it, removed on
//! drop; and multi-document YAML files read as the API server takes objects.

use std::path::{Path, PathBuf};

use crate::{daemon::examples, netns::unique_name};

pub struct ManifestDir(PathBuf);

impl ManifestDir {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(unique_name("lbt-manifests"));
        std::fs::create_dir_all(&dir).expect("manifest directory");
        std::fs::copy(examples().join("manifests/seed-tutorial.yaml"), dir.join("manifests.yaml"))
            .expect("copy manifests");
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Replaces `from` (which must be there) with `to` in the manifests.
    pub fn edit(&self, from: &str, to: &str) {
        let path = self.0.join("manifests.yaml");
        let text = std::fs::read_to_string(&path).expect("read manifests");
        assert!(text.contains(from), "the manifests contain {from:?}");
        std::fs::write(&path, text.replace(from, to)).expect("write manifests");
    }

    /// Writes another file of manifests into the directory.
    pub fn add_file(&self, name: &str, yaml: &str) {
        std::fs::write(self.0.join(name), yaml).expect("write manifests");
    }
}

impl Default for ManifestDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ManifestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every document of the YAML file at `path`, as JSON (the form the API server takes objects
/// in).
pub fn json_documents(path: &Path) -> Vec<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|document| {
            let value: serde_yaml::Value = serde::Deserialize::deserialize(document)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            serde_json::to_value(value).expect("YAML that is JSON too")
        })
        .collect()
}

//! A manifest directory read again and again by the daemon, re-parsing only the files whose
//! size or modification time changed: with services spread over many files, one edit costs one
//! file's parse. Each file is kept as the model's normalised objects, by service, not as API
//! objects (a tenth of the memory), and a refresh says which services the changed files held,
//! before and after, so that only those are rebuilt.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::SystemTime,
};

use super::{ManifestError, Problem, load_file, manifest_files};
use crate::{
    config::NodeConfig,
    model::{ServiceName, ServiceObjects, by_service},
};

/// Modification time and size.
type Stamp = (Option<SystemTime>, u64);

#[derive(Debug)]
pub struct CachedDir {
    /// Slices are normalised for this node (which endpoints are local).
    node: NodeConfig,
    files: BTreeMap<PathBuf, CachedFile>,
}

#[derive(Debug, Default)]
struct CachedFile {
    stamp: Stamp,
    services: BTreeMap<ServiceName, ServiceObjects>,
    problems: Vec<Problem>,
}

impl CachedDir {
    pub fn new(node: &NodeConfig) -> Self {
        Self { node: node.clone(), files: BTreeMap::new() }
    }

    /// Re-reads the directory; returns the services that files added, changed or removed held
    /// before or hold now.
    pub fn refresh(&mut self, dir: &Path) -> Result<BTreeSet<ServiceName>, ManifestError> {
        let mut previous = std::mem::take(&mut self.files);
        let mut changed = BTreeSet::new();
        let mut files = Vec::new();
        for path in manifest_files(dir)? {
            let metadata = std::fs::metadata(&path).ok();
            let stamp = (
                metadata.as_ref().and_then(|m| m.modified().ok()),
                metadata.map_or(0, |m| m.len()),
            );
            let cached = match previous.remove(&path) {
                Some(file) if file.stamp == stamp => Some(file),
                Some(file) => {
                    changed.extend(file.services.into_keys());
                    None
                }
                None => None,
            };
            files.push((path, stamp, cached));
        }
        for (_, gone) in previous {
            changed.extend(gone.services.into_keys());
        }
        let parsed: Vec<bool> = files.iter().map(|(_, _, cached)| cached.is_none()).collect();
        parse_missing(&mut files, &self.node);
        for ((path, _, file), parsed) in files.into_iter().zip(parsed) {
            let file = file.unwrap_or_default();
            if parsed {
                changed.extend(file.services.keys().cloned());
            }
            self.files.insert(path, file);
        }
        Ok(changed)
    }

    /// The objects of `service` from every file, in file order.
    pub fn objects(&self, service: &ServiceName) -> ServiceObjects {
        let mut objects = ServiceObjects::default();
        for file in self.files.values() {
            if let Some(part) = file.services.get(service) {
                objects.extend(part);
            }
        }
        objects
    }

    /// Every service with its objects, by name; borrowed unless several files hold it.
    pub fn services(&self) -> BTreeMap<&ServiceName, Cow<'_, ServiceObjects>> {
        let mut services: BTreeMap<&ServiceName, Cow<'_, ServiceObjects>> = BTreeMap::new();
        for file in self.files.values() {
            for (name, part) in &file.services {
                services
                    .entry(name)
                    .and_modify(|objects| objects.to_mut().extend(part))
                    .or_insert(Cow::Borrowed(part));
            }
        }
        services
    }

    /// Documents or files that could not be read, in file order.
    pub fn problems(&self) -> impl Iterator<Item = &Problem> {
        self.files.values().flat_map(|file| &file.problems)
    }
}

/// Parses the files without a cached result, spread over the machine's cores: a daemon
/// starting on a large directory is bound by YAML parsing. Each thread drops a file's API
/// objects as soon as they are normalised, so only a file's worth per thread is ever held.
fn parse_missing(files: &mut [(PathBuf, Stamp, Option<CachedFile>)], node: &NodeConfig) {
    let mut missing: Vec<&mut (PathBuf, Stamp, Option<CachedFile>)> =
        files.iter_mut().filter(|(_, _, parsed)| parsed.is_none()).collect();
    let workers = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let chunk = missing.len().div_ceil(workers).max(1);
    std::thread::scope(|scope| {
        for entries in missing.chunks_mut(chunk) {
            scope.spawn(move || {
                for (path, stamp, parsed) in entries.iter_mut() {
                    let manifests = load_file(path);
                    *parsed = Some(CachedFile {
                        stamp: *stamp,
                        services: by_service(&manifests.services, &manifests.slices, node),
                        problems: manifests.problems,
                    });
                }
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, cluster_ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {cluster_ip}, ports: [{{port: 80}}]}}\n"
        )
    }

    fn names(services: &BTreeSet<ServiceName>) -> Vec<String> {
        services.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_refresh_names_the_services_of_changed_files_before_and_after() {
        let dir = std::env::temp_dir().join(format!("lb-cached-dir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join("a.yaml"), service("a", "10.96.0.1")).expect("write a");
        std::fs::write(dir.join("b.yaml"), service("b", "10.96.0.2")).expect("write b");
        let node = NodeConfig::from_yaml_str(
            "nodeName: n\nnodeIPs: [192.168.1.1]\nclusterCIDR: 10.244.0.0/16\nserviceCIDR: 10.96.0.0/12",
        )
        .expect("node");
        let mut cache = CachedDir::new(&node);
        let first = cache.refresh(&dir).expect("first read");
        assert_eq!(names(&first), ["default/a", "default/b"]);
        assert!(cache.refresh(&dir).expect("unchanged").is_empty(), "nothing changed");

        // A longer file: the size changes even if the modification time's granularity hides it.
        std::fs::write(dir.join("b.yaml"), service("b2", "10.96.0.22")).expect("edit b");
        std::fs::remove_file(dir.join("a.yaml")).expect("remove a");
        let second = cache.refresh(&dir).expect("second read");
        let listed: Vec<String> = cache.services().keys().map(ToString::to_string).collect();
        let gone = cache.objects(&ServiceName::new("default", "a"));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(names(&second), ["default/a", "default/b", "default/b2"]);
        assert_eq!(listed, ["default/b2"], "the edit is seen and the removed file is gone");
        assert!(gone.is_empty());
        assert_eq!(cache.files.len(), 1);
    }
}

//! A manifest directory read again and again by the daemon, re-parsing only the files whose
//! size or modification time changed: with services spread over many files, one edit costs one
//! file's parse. Each file is kept as the model's normalised objects, by service, not as API
//! objects (a tenth of the memory), and a refresh says which services the changed files held,
//! before and after, so that only those are rebuilt.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use super::{
    ManifestError, Problem, has_manifest_name, is_manifest_file, load_file, manifest_files,
};
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
    files: BTreeMap<Arc<Path>, CachedFile>,
    /// The files holding objects of each service, in file order: a change looks up its
    /// service's objects without visiting every file.
    holders: HashMap<ServiceName, Vec<Arc<Path>>>,
}

#[derive(Debug, Default)]
struct CachedFile {
    stamp: Stamp,
    services: BTreeMap<ServiceName, ServiceObjects>,
    problems: Vec<Problem>,
}

impl CachedDir {
    pub fn new(node: &NodeConfig) -> Self {
        Self { node: node.clone(), files: BTreeMap::new(), holders: HashMap::new() }
    }

    /// Re-reads the directory; returns the services whose objects changed in files added,
    /// changed or removed.
    pub fn refresh(&mut self, dir: &Path) -> Result<BTreeSet<ServiceName>, ManifestError> {
        let listed: BTreeSet<PathBuf> = manifest_files(dir)?.into_iter().collect();
        let gone: Vec<Arc<Path>> =
            self.files.keys().filter(|path| !listed.contains(&***path)).cloned().collect();
        let mut changed = BTreeSet::new();
        for path in gone {
            changed
                .extend(self.remove_file(&path).into_iter().flat_map(|f| f.services.into_keys()));
        }
        changed.append(&mut self.reparse(listed.into_iter().collect()));
        Ok(changed)
    }

    /// Re-reads only `paths`, the files a watcher reported (changed, created or removed), and
    /// returns the services whose objects changed: a change then costs its file, not a look
    /// at every file of the directory. `None` when a path is not a manifest file of the
    /// directory (a directory, a config map's `..data` swap): then only [`CachedDir::refresh`]
    /// can tell what changed.
    pub fn refresh_files(
        &mut self,
        dir: &Path,
        paths: impl IntoIterator<Item = PathBuf>,
    ) -> Option<BTreeSet<ServiceName>> {
        let mut present = Vec::new();
        let mut changed = BTreeSet::new();
        for path in paths {
            if path.parent() != Some(dir) || !has_manifest_name(&path) {
                return None;
            }
            if is_manifest_file(&path) {
                present.push(path);
            } else {
                changed.extend(
                    self.remove_file(&path).into_iter().flat_map(|f| f.services.into_keys()),
                );
            }
        }
        changed.append(&mut self.reparse(present));
        Some(changed)
    }

    /// Parses those of `paths` whose stamp differs from the cached one (or that are not
    /// cached), caches them, and returns the services whose objects differ from before.
    fn reparse(&mut self, paths: Vec<PathBuf>) -> BTreeSet<ServiceName> {
        let stale: Vec<(PathBuf, Stamp)> = paths
            .into_iter()
            .map(|path| {
                let stamp = stamp(&path);
                (path, stamp)
            })
            .filter(|(path, stamp)| {
                self.files.get(path.as_path()).is_none_or(|file| file.stamp != *stamp)
            })
            .collect();
        let parsed = parse(&stale, &self.node);
        let mut changed = BTreeSet::new();
        for ((path, _), file) in stale.into_iter().zip(parsed) {
            let before = self.remove_file(&path).map(|file| file.services).unwrap_or_default();
            changed.extend(differing(&before, &file.services));
            self.insert_file(path, file);
        }
        changed
    }

    fn insert_file(&mut self, path: PathBuf, file: CachedFile) {
        let path: Arc<Path> = path.into();
        for service in file.services.keys() {
            let holders = self.holders.entry(service.clone()).or_default();
            let at = holders.binary_search(&path).unwrap_or_else(|at| at);
            holders.insert(at, Arc::clone(&path));
        }
        self.files.insert(path, file);
    }

    fn remove_file(&mut self, path: &Path) -> Option<CachedFile> {
        let file = self.files.remove(path)?;
        for service in file.services.keys() {
            if let Some(holders) = self.holders.get_mut(service) {
                holders.retain(|holder| **holder != *path);
                if holders.is_empty() {
                    self.holders.remove(service);
                }
            }
        }
        Some(file)
    }

    /// The objects of `service` from every file, in file order.
    pub fn objects(&self, service: &ServiceName) -> ServiceObjects {
        let mut objects = ServiceObjects::default();
        for path in self.holders.get(service).into_iter().flatten() {
            if let Some(part) = self.files.get(path).and_then(|file| file.services.get(service)) {
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

fn stamp(path: &Path) -> Stamp {
    let metadata = std::fs::metadata(path).ok();
    (metadata.as_ref().and_then(|m| m.modified().ok()), metadata.map_or(0, |m| m.len()))
}

/// The services whose objects differ between two readings of a file: rewriting a file of a
/// hundred services to change one rebuilds one.
fn differing(
    before: &BTreeMap<ServiceName, ServiceObjects>,
    after: &BTreeMap<ServiceName, ServiceObjects>,
) -> Vec<ServiceName> {
    let names: BTreeSet<&ServiceName> = before.keys().chain(after.keys()).collect();
    names.into_iter().filter(|name| before.get(*name) != after.get(*name)).cloned().collect()
}

/// Parses `files`, in order, spread over the machine's cores: a daemon starting on a large
/// directory is bound by YAML parsing. Each thread drops a file's API objects as soon as they
/// are normalised, so only a file's worth per thread is ever held.
fn parse(files: &[(PathBuf, Stamp)], node: &NodeConfig) -> Vec<CachedFile> {
    let workers = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let chunk = files.len().div_ceil(workers).max(1);
    std::thread::scope(|scope| {
        let parsers: Vec<_> = files
            .chunks(chunk)
            .map(|entries| {
                scope.spawn(move || {
                    let parse_one = |(path, stamp): &(PathBuf, Stamp)| {
                        let manifests = load_file(path);
                        CachedFile {
                            stamp: *stamp,
                            services: by_service(&manifests.services, &manifests.slices, node),
                            problems: manifests.problems,
                        }
                    };
                    entries.iter().map(parse_one).collect::<Vec<_>>()
                })
            })
            .collect();
        parsers.into_iter().flat_map(|parser| parser.join().expect("a parser thread")).collect()
    })
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

    #[test]
    fn a_refresh_of_named_files_reports_only_services_whose_objects_changed() {
        let dir = std::env::temp_dir().join(format!("lb-cached-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let both = |second_ip: &str| {
            format!("{}---\n{}", service("a", "10.96.0.1"), service("b", second_ip))
        };
        let file = dir.join("ab.yaml");
        std::fs::write(&file, both("10.96.0.2")).expect("write");
        let node = NodeConfig::from_yaml_str(
            "nodeName: n\nnodeIPs: [192.168.1.1]\nclusterCIDR: 10.244.0.0/16\nserviceCIDR: 10.96.0.0/12",
        )
        .expect("node");
        let mut cache = CachedDir::new(&node);
        cache.refresh(&dir).expect("first read");

        std::fs::write(&file, both("10.96.0.20")).expect("edit b");
        let edited = cache.refresh_files(&dir, [file.clone()]);
        let unchanged = cache.refresh_files(&dir, [file.clone()]);
        let elsewhere = cache.refresh_files(&dir, [dir.join("..data")]);
        std::fs::remove_file(&file).expect("remove");
        let removed = cache.refresh_files(&dir, [file]);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            edited.as_ref().map(names),
            Some(vec!["default/b".to_owned()]),
            "a is unchanged"
        );
        assert_eq!(unchanged.map(|s| s.len()), Some(0), "same stamp: not even parsed");
        assert_eq!(elsewhere, None, "not a manifest file: the caller must read everything");
        assert_eq!(
            removed.as_ref().map(names),
            Some(vec!["default/a".to_owned(), "default/b".to_owned()])
        );
        assert!(cache.services().is_empty());
    }
}

//! Reading Services and EndpointSlices from a directory of Kubernetes manifests, the file source
//! of the desired model (tests, demos, and nodes without an API server).
//!
//! A bad document or file is a [`Problem`] and is skipped; everything else still loads, so one
//! typo does not take every service down. Only the directory itself being unreadable fails.

mod cached_dir;

use std::{
    fmt, io,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde::Deserialize as _;
use serde_yaml::Value;

pub use self::cached_dir::CachedDir;

/// What a manifest directory held.
#[derive(Debug, Clone, Default)]
pub struct Manifests {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    /// Documents or files that could not be read; each was skipped.
    pub problems: Vec<Problem>,
    /// Well-formed objects of kinds the model does not use (deployments, config maps, ...).
    pub ignored: Vec<Ignored>,
}

/// A document or file that was skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// `Kind namespace/name` when the name can be read, else `document N` (from 1); `None` when
    /// the problem is with the file as a whole.
    pub object: Option<String>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.file.display())?;
        if let Some(object) = &self.object {
            write!(f, "{object}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// An object of a kind the model does not use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ignored {
    pub file: PathBuf,
    /// `apiVersion Kind namespace/name`, e.g. `apps/v1 Deployment default/web`.
    pub object: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("reading manifest directory {}", dir.display())]
    ReadDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Reads every `*.yaml` and `*.yml` file directly in `dir`, in name order. Hidden files are left
/// out: editors keep their temporary copies there, and a mounted config map keeps its data under
/// `..data` with the visible names as links to it.
pub fn load_dir(dir: &Path) -> Result<Manifests, ManifestError> {
    let mut manifests = Manifests::default();
    for file in &manifest_files(dir)? {
        manifests.read_file(file);
    }
    Ok(manifests)
}

/// The manifest files of `dir`, sorted.
pub(crate) fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let read_dir_error = |source| ManifestError::ReadDir { dir: dir.to_owned(), source };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_dir_error)? {
        let path = entry.map_err(read_dir_error)?.path();
        if is_manifest_file(&path) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Reads one file; problems are recorded, not returned.
pub fn load_file(path: &Path) -> Manifests {
    let mut manifests = Manifests::default();
    manifests.read_file(path);
    manifests
}

pub(crate) fn is_manifest_file(path: &Path) -> bool {
    // is_file follows links, which a mounted config map is made of.
    has_manifest_name(path) && path.is_file()
}

/// Whether `path`'s name is one a manifest file may have (whether or not it exists).
pub(crate) fn has_manifest_name(path: &Path) -> bool {
    let visible = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| !n.starts_with('.'));
    let yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
    visible && yaml
}

impl Manifests {
    /// Adds the objects of one file.
    pub fn read_file(&mut self, path: &Path) {
        match std::fs::read_to_string(path) {
            Ok(text) => self.read_str(path, &text),
            Err(error) => self.problem(path, None, format!("cannot be read: {error}")),
        }
    }

    /// Adds the objects of a multi-document YAML stream; `file` names it in problems.
    pub fn read_str(&mut self, file: &Path, yaml: &str) {
        for (index, document) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
            let number = index + 1;
            match Value::deserialize(document) {
                Ok(Value::Null) => {}
                Ok(value) => self.add_document(file, &format!("document {number}"), value),
                Err(error) => {
                    // Stop this file: after a syntax error serde_yaml 0.9 returns the same error
                    // for every further document, and reading past an unknown anchor panics.
                    let at =
                        if number == 1 { String::new() } else { format!(" in document {number}") };
                    let message = format!("not valid YAML{at}: {error}; the rest is skipped");
                    self.problem(file, None, message);
                    return;
                }
            }
        }
    }

    /// Adds one document; `place` says where it is when it has no readable name.
    fn add_document(&mut self, file: &Path, place: &str, mut value: Value) {
        if let Err(error) = value.apply_merge() {
            self.problem(file, Some(describe(&value, place)), format!("YAML merge keys: {error}"));
            return;
        }
        let api_version = value.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
        let kind = value.get("kind").and_then(Value::as_str).unwrap_or_default();
        match (api_version, kind) {
            ("v1", "Service") => {
                if let Some(service) = self.typed(file, place, value) {
                    self.services.push(service);
                }
            }
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                if let Some(slice) = self.typed(file, place, value) {
                    self.slices.push(slice);
                }
            }
            // What `kubectl get -o yaml` prints for several objects.
            ("v1", "List") => self.add_list(file, place, value),
            ("", _) | (_, "") => {
                let message = "no apiVersion and kind: not a Kubernetes object".to_owned();
                self.problem(file, Some(describe(&value, place)), message);
            }
            _ => {
                let object = format!("{api_version} {}", describe(&value, place));
                self.ignored.push(Ignored { file: file.to_owned(), object });
            }
        }
    }

    fn add_list(&mut self, file: &Path, place: &str, mut value: Value) {
        let items = match value.get_mut("items").map(std::mem::take) {
            Some(Value::Sequence(items)) => items,
            None | Some(Value::Null) => Vec::new(),
            Some(_) => {
                let message = "items is not a list".to_owned();
                self.problem(file, Some(place.to_owned()), message);
                return;
            }
        };
        for (index, item) in items.into_iter().enumerate() {
            self.add_document(file, &format!("{place} item {}", index + 1), item);
        }
    }

    /// The document as a typed object, or `None` with a problem naming the object and the field.
    fn typed<T: serde::de::DeserializeOwned>(
        &mut self,
        file: &Path,
        place: &str,
        value: Value,
    ) -> Option<T> {
        let object = describe(&value, place);
        match serde_path_to_error::deserialize(value) {
            Ok(typed) => Some(typed),
            Err(error) => {
                self.problem(file, Some(object), error.to_string());
                None
            }
        }
    }

    fn problem(&mut self, file: &Path, object: Option<String>, message: String) {
        self.problems.push(Problem { file: file.to_owned(), object, message });
    }
}

/// `Kind namespace/name` as far as it can be read from an untyped document, else `place`.
fn describe(value: &Value, place: &str) -> String {
    let metadata = value.get("metadata");
    let field = |key| metadata.and_then(|m| m.get(key)).and_then(Value::as_str);
    let Some(name) = field("name") else { return place.to_owned() };
    let namespace = field("namespace").unwrap_or("default");
    match value.get("kind").and_then(Value::as_str) {
        Some(kind) => format!("{kind} {namespace}/{name}"),
        None => format!("{namespace}/{name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory under the system's temporary directory, removed when the test ends, even by
    /// a panic.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(test: &str) -> Self {
            let path = std::env::temp_dir().join(format!("lb-user-{test}-{}", std::process::id()));
            // A leftover from a killed run of the same process id would mix in old files.
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path)
                .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
            Self(path)
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, text)
                .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn names<
        T: k8s_openapi::Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
    >(
        objects: &[T],
    ) -> Vec<&str> {
        objects.iter().map(|o| o.metadata().name.as_deref().unwrap_or("<unnamed>")).collect()
    }

    const GOOD: &str = "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
---
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [10.244.1.1]}]
ports: [{port: 80}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
";

    const ONE_BAD_DOCUMENT: &str = "
apiVersion: v1
kind: Service
metadata: {name: fine}
spec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: typo}
spec: {clusterIP: 10.96.0.3, ports: [{port: eighty}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {labels: {kubernetes.io/service-name: fine}}
addressType: IPv4
endpoints: {addresses: [10.244.1.2]}
";

    #[test]
    fn broken_files_and_documents_are_problems_and_the_rest_loads() {
        let dir = TempDir::new("manifests-broken");
        dir.write("a-good.yaml", GOOD);
        let broken = dir
            .write("b-broken.yml", "apiVersion: v1\nkind: Service\nmetadata: {name: [unclosed\n");
        let mixed = dir.write("c-mixed.yaml", ONE_BAD_DOCUMENT);
        dir.write("d-notes.txt", "not: [a manifest");
        dir.write(".e-hidden.yaml", "not: [a manifest");
        std::fs::create_dir(dir.0.join("f-subdir")).expect("creating a subdirectory");
        dir.write("f-subdir/nested.yaml", "not: [a manifest");

        let manifests = load_dir(&dir.0).expect("the directory is readable");

        assert_eq!(names(&manifests.services), ["web", "fine"]);
        assert_eq!(names(&manifests.slices), ["web-1"]);
        assert_eq!(manifests.ignored.len(), 1, "{:?}", manifests.ignored);
        assert_eq!(manifests.ignored[0].object, "apps/v1 Deployment shop/web");
        let [whole_file, typo, unnamed] = manifests.problems.as_slice() else {
            panic!("expected three problems: {:#?}", manifests.problems);
        };
        assert_eq!((&whole_file.file, &whole_file.object), (&broken, &None));
        assert!(whole_file.message.starts_with("not valid YAML: "), "{whole_file}");
        assert_eq!((&typo.file, typo.object.as_deref()), (&mixed, Some("Service default/typo")));
        assert!(typo.message.starts_with("spec.ports[0].port: invalid type"), "{typo}");
        assert_eq!((&unnamed.file, unnamed.object.as_deref()), (&mixed, Some("document 3")));
        assert!(unnamed.message.starts_with("endpoints: invalid type"), "{unnamed}");
        assert_eq!(
            typo.to_string(),
            format!("{}: Service default/typo: {}", mixed.display(), typo.message)
        );
    }

    #[test]
    fn a_syntax_error_later_in_a_file_keeps_the_documents_before_it() {
        let mut manifests = Manifests::default();
        let text = format!("{GOOD}---\nkind: [\n---\n{ONE_BAD_DOCUMENT}");
        manifests.read_str(Path::new("later.yaml"), &text);
        assert_eq!(names(&manifests.services), ["web"]);
        assert_eq!(manifests.problems.len(), 1, "{:?}", manifests.problems);
        assert!(
            manifests.problems[0].message.starts_with("not valid YAML in document 5: "),
            "{}",
            manifests.problems[0]
        );
    }

    #[test]
    fn documents_that_are_not_objects_are_problems() {
        let mut manifests = Manifests::default();
        manifests
            .read_str(Path::new("x.yaml"), "nodeName: a\n---\n- 1\n---\nmetadata: {name: n}\n");
        let objects: Vec<_> = manifests.problems.iter().map(|p| p.object.as_deref()).collect();
        assert_eq!(objects, [Some("document 1"), Some("document 2"), Some("default/n")]);
        assert!(manifests.problems.iter().all(|p| p.message.contains("not a Kubernetes object")));
    }

    #[test]
    fn a_list_is_read_item_by_item() {
        let mut manifests = Manifests::default();
        manifests.read_str(
            Path::new("list.yaml"),
            "apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Service, metadata: {name: a}, spec: {ports: [{port: 80}]}}
- {apiVersion: v1, kind: Service, spec: {ports: [{port: x}]}}
- {apiVersion: v1, kind: ConfigMap, metadata: {name: c}}",
        );
        assert_eq!(names(&manifests.services), ["a"]);
        assert_eq!(manifests.problems.len(), 1, "{:?}", manifests.problems);
        assert_eq!(manifests.problems[0].object.as_deref(), Some("document 1 item 2"));
        assert_eq!(manifests.ignored[0].object, "v1 ConfigMap default/c");
    }

    #[test]
    fn merge_keys_are_applied() {
        let mut manifests = Manifests::default();
        manifests.read_str(
            Path::new("merge.yaml"),
            "apiVersion: v1
kind: Service
metadata: {name: m}
spec:
  ports:
  - &http {name: http, port: 80, protocol: TCP}
  - {<<: *http, name: alt, port: 8080}",
        );
        assert!(manifests.problems.is_empty(), "{:?}", manifests.problems);
        let ports =
            manifests.services[0].spec.as_ref().and_then(|s| s.ports.clone()).unwrap_or_default();
        assert_eq!(ports[1].protocol.as_deref(), Some("TCP"));
    }

    #[test]
    fn the_seed_manifests_load_without_problems() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/scenarios/seed/manifests.yaml");
        let manifests = load_file(&path);
        assert!(manifests.problems.is_empty(), "{:#?}", manifests.problems);
        assert_eq!(manifests.services.len(), 16);
        assert_eq!(manifests.slices.len(), 14);
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_it() {
        let error = load_dir(Path::new("/nonexistent/manifests")).expect_err("no such directory");
        assert_eq!(error.to_string(), "reading manifest directory /nonexistent/manifests");
    }
}

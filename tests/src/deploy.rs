//! The deployment manifests (`deploy/lb-xdp.yaml`), read into their Kubernetes API types.

use std::path::{Path, PathBuf};

use serde::{Serialize, de::DeserializeOwned};

pub fn path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/lb-xdp.yaml")
}

/// Every document of the file, as JSON.
pub fn documents() -> Vec<serde_json::Value> {
    crate::manifests::json_documents(&path())
}

/// The one document of `K`'s kind, as `K`. A field `K` does not know (a typo the API server
/// would reject or drop) fails: the typed object must serialise back to the document.
pub fn object<K>() -> K
where
    K: k8s_openapi::Resource + DeserializeOwned + Serialize,
{
    let mut found = documents().into_iter().filter(|d| d["kind"] == K::KIND);
    let document = found.next().unwrap_or_else(|| panic!("no {} in the file", K::KIND));
    assert!(found.next().is_none(), "one {} expected", K::KIND);
    assert_eq!(document["apiVersion"], K::API_VERSION, "{}", K::KIND);
    let object: K = serde_json::from_value(document.clone())
        .unwrap_or_else(|e| panic!("the {} is not a valid {}: {e}", K::KIND, K::API_VERSION));
    let back = serde_json::to_value(&object).expect("serialising");
    assert_eq!(back, document, "the {} has fields its type does not know", K::KIND);
    object
}

/// The node configuration the ConfigMap gives every node.
pub fn node_config_text() -> String {
    let config_map: k8s_openapi::api::core::v1::ConfigMap = object();
    let data = config_map.data.expect("the ConfigMap has data");
    data.get("node.yaml").expect("node.yaml in the ConfigMap").clone()
}

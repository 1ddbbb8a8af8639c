//! API objects decoded one at a time, so that one the typed model cannot read is named and
//! skipped rather than failing everything with it.
//!
//! kube-rs decodes a list page as one value: a single object of a shape its type does not accept
//! (a field of another type, from an API server newer than the client, or a proxy's mangling)
//! fails the whole page, and the watcher retries that list for ever, so a daemon started then
//! programs nothing at all; such an object in a watch event is dropped with a decode error that
//! names nothing. Each object is therefore read as a JSON value first and decoded on its own.
//! (Not as a raw slice of the response: a watch event's object reaches its decoder through
//! serde's buffer for tagged enums, which cannot hand out raw JSON.)

use k8s_openapi::{Metadata, Resource, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use serde::{Deserialize, Deserializer, de::DeserializeOwned};
use serde_json::Value;

/// An API object of type `K`, or what could be read of one that did not decode as a `K`.
#[derive(Debug, Clone)]
pub enum Decoded<K> {
    Object(K),
    /// Boxed: rare, and as large as a small object.
    Malformed(Box<Malformed>),
}

/// An object that did not decode: its metadata (see [`metadata_of`]), and why.
#[derive(Debug, Clone)]
pub struct Malformed {
    pub metadata: ObjectMeta,
    pub error: String,
}

impl<'de, K: DeserializeOwned> Deserialize<'de> for Decoded<K> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Not JSON at all: an error of the response, not of one object.
        let value = Value::deserialize(deserializer)?;
        Ok(match K::deserialize(&value) {
            Ok(object) => Self::Object(object),
            Err(error) => Self::Malformed(Box::new(Malformed {
                metadata: metadata_of(&value),
                error: error.to_string(),
            })),
        })
    }
}

/// The metadata of an object that did not decode. Where the metadata does not decode either,
/// what names and versions the object, field by field: its name and namespace, so that it is
/// reported and its last readable version found, and its resourceVersion, without which
/// kube-rs's watcher relists the whole kind.
fn metadata_of(object: &Value) -> ObjectMeta {
    let Some(metadata) = object.get("metadata") else { return ObjectMeta::default() };
    ObjectMeta::deserialize(metadata).unwrap_or_else(|_| {
        let text = |field: &str| metadata.get(field).and_then(Value::as_str).map(str::to_owned);
        let labels = metadata.get("labels").and_then(Value::as_object).map(|labels| {
            let texts = labels.iter().filter_map(|(key, value)| Some((key, value.as_str()?)));
            texts.map(|(key, value)| (key.clone(), value.to_owned())).collect()
        });
        ObjectMeta {
            name: text("name"),
            namespace: text("namespace"),
            resource_version: text("resourceVersion"),
            uid: text("uid"),
            labels,
            ..ObjectMeta::default()
        }
    })
}

impl<K: Resource> Resource for Decoded<K> {
    const API_VERSION: &'static str = K::API_VERSION;
    const GROUP: &'static str = K::GROUP;
    const KIND: &'static str = K::KIND;
    const VERSION: &'static str = K::VERSION;
    const URL_PATH_SEGMENT: &'static str = K::URL_PATH_SEGMENT;
    type Scope = K::Scope;
}

impl<K: Metadata<Ty = ObjectMeta>> Metadata for Decoded<K> {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        match self {
            Self::Object(object) => object.metadata(),
            Self::Malformed(malformed) => &malformed.metadata,
        }
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Self::Object(object) => object.metadata_mut(),
            Self::Malformed(malformed) => &mut malformed.metadata,
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Service;
    use serde_json::json;

    use super::*;

    #[test]
    fn a_list_with_an_object_of_the_wrong_shape_keeps_the_others_and_names_it() {
        let list = json!([
            { "metadata": { "name": "good", "namespace": "shop" }, "spec": { "ports": [{ "port": 80 }] } },
            { "metadata": { "name": "bad", "namespace": "shop" }, "spec": { "ports": [{ "port": "eighty" }] } },
        ]);
        let decoded: Vec<Decoded<Service>> =
            serde_json::from_slice(&serde_json::to_vec(&list).unwrap()).expect("the list decodes");
        let Decoded::Object(good) = &decoded[0] else { panic!("{:?}", decoded[0]) };
        assert_eq!(good.metadata.name.as_deref(), Some("good"));
        let Decoded::Malformed(bad) = &decoded[1] else { panic!("{:?}", decoded[1]) };
        assert_eq!(bad.metadata.name.as_deref(), Some("bad"));
        assert_eq!(bad.metadata.namespace.as_deref(), Some("shop"));
        assert!(bad.error.contains("eighty"), "{}", bad.error);
    }

    #[test]
    fn an_object_whose_metadata_does_not_decode_keeps_what_names_and_versions_it() {
        let metadata = json!({
            "name": "bad",
            "namespace": "shop",
            "resourceVersion": "5",
            "creationTimestamp": 7,
            "labels": { "kubernetes.io/service-name": "web", "odd": 1 },
        });
        let object = json!({ "metadata": metadata, "spec": {} }).to_string();
        let decoded: Decoded<Service> = serde_json::from_str(&object).expect("decodes");
        let Decoded::Malformed(bad) = decoded else { panic!("{decoded:?}") };
        let name = (bad.metadata.namespace.as_deref(), bad.metadata.name.as_deref());
        assert_eq!(name, (Some("shop"), Some("bad")));
        assert_eq!(bad.metadata.resource_version.as_deref(), Some("5"));
        let labels = bad.metadata.labels.expect("the labels that are strings");
        assert_eq!(
            labels.into_iter().collect::<Vec<_>>(),
            [("kubernetes.io/service-name".to_owned(), "web".to_owned())]
        );
    }

    #[test]
    fn an_object_whose_name_is_unreadable_is_malformed_without_a_name() {
        let object = json!({ "metadata": { "name": 7 }, "spec": {} }).to_string();
        let decoded: Decoded<Service> = serde_json::from_str(&object).expect("decodes");
        let Decoded::Malformed(bad) = decoded else { panic!("{decoded:?}") };
        assert_eq!(bad.metadata.name, None);
    }

    #[test]
    fn a_response_that_is_not_json_is_still_an_error() {
        assert!(serde_json::from_str::<Decoded<Service>>("{\"metadata\": ").is_err());
    }
}

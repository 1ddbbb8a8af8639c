//! A scripted Kubernetes API server for the watcher tests, in the manner of kube-rs's
//! controller-rs fixtures: a `tower_test` mock stands in for the connection, and each test plays
//! the server's side of the conversation one request at a time (wait for it, assert its path and
//! query, answer it), so that it can look at the source between any two steps.
//!
//! The three watchers send their requests concurrently and in no fixed order, so the server
//! routes them by path: asking for the next request of one resource holds back the requests of
//! the others until they are asked for. A request never asked for stays unanswered, as a watch
//! that has nothing to say does.
//!
//! Public behind the `scripted-api-server` feature for the control-plane benchmark.
#![expect(
    clippy::missing_panics_doc,
    reason = "a test fixture: a conversation that goes wrong fails the test or benchmark"
)]

use std::{collections::BTreeMap, time::Duration};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{
    Either, Full,
    channel::{Channel, Sender},
};
use kube::Client;
use serde_json::{Value, json};
use tower_test::mock;

use super::{SERVICE_LABEL_SELECTOR, SLICE_LABEL_SELECTOR};

/// The node the tests run on.
pub const NODE: &str = "node-a";

/// Longer than any backoff the tests run into (paused time skips it anyway), so that a missing
/// request fails the test instead of hanging it.
pub const PATIENCE: Duration = Duration::from_secs(120);

/// Response bodies: a list or an error is sent whole; a watch streams events while the test holds
/// its sender.
type Body = Either<Full<Bytes>, Channel<Bytes>>;
type Handle = mock::Handle<Request<kube::client::Body>, Response<Body>>;

/// A client talking to a new scripted server.
pub fn pair() -> (Client, ApiServer) {
    let (service, handle) = mock::pair::<Request<kube::client::Body>, Response<Body>>();
    (Client::new(service, "default"), ApiServer { handle, held: Vec::new() })
}

/// A watched resource, as told apart by the request path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Services,
    Slices,
    Node,
}

impl Resource {
    fn of_path(path: &str) -> Option<Self> {
        [Self::Services, Self::Slices, Self::Node].into_iter().find(|r| r.path() == path)
    }

    fn path(self) -> &'static str {
        match self {
            Self::Services => "/api/v1/services",
            Self::Slices => "/apis/discovery.k8s.io/v1/endpointslices",
            Self::Node => "/api/v1/nodes",
        }
    }

    /// The selector every request for this resource must carry.
    fn selector(self) -> (&'static str, String) {
        match self {
            Self::Services => ("labelSelector", SERVICE_LABEL_SELECTOR.to_owned()),
            Self::Slices => ("labelSelector", SLICE_LABEL_SELECTOR.to_owned()),
            Self::Node => ("fieldSelector", format!("metadata.name={NODE}")),
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Self::Services | Self::Node => "v1",
            Self::Slices => "discovery.k8s.io/v1",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Self::Services => "Service",
            Self::Slices => "EndpointSlice",
            Self::Node => "Node",
        }
    }
}

/// The server side of the tests' conversations.
pub struct ApiServer {
    handle: Handle,
    /// Requests that arrived while the test waited for another resource's, oldest first.
    held: Vec<Incoming>,
}

impl ApiServer {
    /// The next request for `resource`, however the watchers' requests interleave.
    pub async fn next(&mut self, resource: Resource) -> Incoming {
        if let Some(at) = self.held.iter().position(|request| request.resource == resource) {
            return self.held.remove(at);
        }
        loop {
            let (request, respond) = tokio::time::timeout(PATIENCE, self.handle.next_request())
                .await
                .unwrap_or_else(|_| panic!("no {resource:?} request within {PATIENCE:?}"))
                .expect("the client is gone");
            let incoming = Incoming::new(&request, respond);
            if incoming.resource == resource {
                return incoming;
            }
            self.held.push(incoming);
        }
    }

    /// Expects a complete list of `resource` and answers `items` at `resource_version`.
    pub async fn list(&mut self, resource: Resource, resource_version: &str, items: &[Value]) {
        let request = self.next(resource).await;
        request.assert_list(None);
        request.answer_list(resource_version, items, None);
    }

    /// Expects a watch of `resource` from `resource_version` and answers with an open stream.
    pub async fn watch(&mut self, resource: Resource, resource_version: &str) -> WatchStream {
        let request = self.next(resource).await;
        request.assert_watch(resource_version);
        request.answer_watch()
    }
}

/// A request waiting for its answer.
pub struct Incoming {
    resource: Resource,
    /// Each parameter once: kube-rs sends none twice.
    query: BTreeMap<String, String>,
    respond: mock::SendResponse<Response<Body>>,
}

impl Incoming {
    fn new(
        request: &Request<kube::client::Body>,
        respond: mock::SendResponse<Response<Body>>,
    ) -> Self {
        assert_eq!(request.method(), http::Method::GET, "the source only reads: {}", request.uri());
        let path = request.uri().path();
        let resource = Resource::of_path(path)
            .unwrap_or_else(|| panic!("request for an unexpected path: {}", request.uri()));
        let query = form_urlencoded::parse(request.uri().query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
        Self { resource, query, respond }
    }

    /// Asserts a list (a page after `continue_token` when given): the selector, kube-rs's page
    /// size, and no resourceVersion, so the API server answers from a quorum read.
    pub fn assert_list(&self, continue_token: Option<&str>) {
        let mut expected = self.expected_query([("limit", "500")]);
        if let Some(token) = continue_token {
            expected.insert("continue".to_owned(), token.to_owned());
        }
        assert_eq!(self.query, expected, "{:?} list query", self.resource);
    }

    /// Asserts a watch from `resource_version` with bookmarks requested.
    pub fn assert_watch(&self, resource_version: &str) {
        let expected = self.expected_query([
            ("watch", "true"),
            ("timeoutSeconds", "290"),
            ("allowWatchBookmarks", "true"),
            ("resourceVersion", resource_version),
        ]);
        assert_eq!(self.query, expected, "{:?} watch query", self.resource);
    }

    fn expected_query<const N: usize>(&self, pairs: [(&str, &str); N]) -> BTreeMap<String, String> {
        let (key, selector) = self.resource.selector();
        pairs
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .chain([(key.to_owned(), selector)])
            .collect()
    }

    /// Answers a list: `items` at `resource_version`, with a continue token when more pages
    /// follow.
    pub fn answer_list(
        self,
        resource_version: &str,
        items: &[Value],
        continue_token: Option<&str>,
    ) {
        let mut metadata = json!({ "resourceVersion": resource_version });
        if let Some(token) = continue_token {
            metadata["continue"] = json!(token);
        }
        let list = json!({
            "apiVersion": self.resource.api_version(),
            "kind": format!("{}List", self.resource.kind()),
            "metadata": metadata,
            "items": items,
        });
        self.respond.send_response(Response::new(whole(&list)));
    }

    /// Answers a watch with a stream that stays open while the returned sender lives.
    pub fn answer_watch(self) -> WatchStream {
        let (sender, body) = Channel::new(16);
        self.respond.send_response(Response::new(Either::Right(body)));
        WatchStream { resource: self.resource, sender }
    }

    /// Answers with an HTTP error status and the API server's Status body.
    pub fn answer_status(self, status: StatusCode, reason: &str) {
        let body = json!({
            "apiVersion": "v1",
            "kind": "Status",
            "status": "Failure",
            "message": format!("scripted {reason}"),
            "reason": reason,
            "code": status.as_u16(),
        });
        let mut response = Response::new(whole(&body));
        *response.status_mut() = status;
        self.respond.send_response(response);
    }

    /// Fails the request as a refused connection does: the API server is unreachable.
    pub fn refuse(self) {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "scripted outage");
        self.respond.send_error(refused);
    }
}

fn whole(json: &Value) -> Body {
    Either::Left(Full::new(Bytes::from(json.to_string())))
}

/// An open watch response: each call sends one event line; dropping it (or [`Self::close`])
/// ends the response, as the API server does when the watch times out or the connection drops.
pub struct WatchStream {
    resource: Resource,
    sender: Sender<Bytes>,
}

impl WatchStream {
    pub async fn added(&mut self, object: Value) {
        self.send("ADDED", object).await;
    }

    pub async fn modified(&mut self, object: Value) {
        self.send("MODIFIED", object).await;
    }

    pub async fn deleted(&mut self, object: Value) {
        self.send("DELETED", object).await;
    }

    /// A bookmark: nothing changed up to `resource_version`.
    pub async fn bookmark(&mut self, resource_version: &str) {
        let object = json!({
            "apiVersion": self.resource.api_version(),
            "kind": self.resource.kind(),
            "metadata": { "resourceVersion": resource_version },
        });
        self.send("BOOKMARK", object).await;
    }

    /// The ERROR event the API server sends when the watch's resourceVersion has left its
    /// window (after which it closes the response).
    pub async fn gone(&mut self) {
        let status = json!({
            "apiVersion": "v1",
            "kind": "Status",
            "status": "Failure",
            "message": "too old resource version",
            "reason": "Expired",
            "code": 410,
        });
        self.send("ERROR", status).await;
    }

    async fn send(&mut self, event_type: &str, object: Value) {
        let line = format!("{}\n", json!({ "type": event_type, "object": object }));
        tokio::time::timeout(PATIENCE, self.sender.send_data(Bytes::from(line)))
            .await
            .unwrap_or_else(|_| panic!("the {:?} watcher stopped reading", self.resource))
            .unwrap_or_else(|_| panic!("the {:?} watcher dropped its watch", self.resource));
    }

    /// Ends the response.
    pub fn close(self) {
        drop(self.sender);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::Resource;

    /// The server answers only what it knows and panics at anything else the source requests;
    /// the daemon's RBAC role is checked against `watched_resources`. Both must name the same.
    #[test]
    fn it_serves_exactly_what_the_source_says_it_watches() {
        let served: BTreeSet<_> = [Resource::Services, Resource::Slices, Resource::Node]
            .map(|resource| resource.path().to_owned())
            .into();
        let watched: BTreeSet<_> = super::super::watched_resources()
            .into_iter()
            .map(|(group, resource)| match group {
                "" => format!("/api/v1/{resource}"),
                group => format!("/apis/{group}/v1/{resource}"),
            })
            .collect();
        assert_eq!(served, watched);
    }
}

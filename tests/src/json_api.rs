//! JSON requests to a [`TestNode`]'s HTTP API, and what its error answers say.

use serde_json::Value;

use crate::TestNode;

impl TestNode {
    /// `POST path` on this node with its development API key, `body` sent as JSON.
    pub async fn post_json(&self, path: &str, body: &Value) -> reqwest::Result<reqwest::Response> {
        self.client().post(self.url(path)).json(body).send().await
    }
}

/// The body of the error answer `resp` (which must be JSON), asserting that its
/// `error.message` says `words`.
pub async fn error_saying(resp: reqwest::Response, words: &str) -> Value {
    let v: Value = match resp.json().await {
        Ok(v) => v,
        Err(e) => panic!("an error answer without a JSON body: {e}"),
    };
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(words)),
        "the error does not say {words:?}: {v}"
    );
    v
}

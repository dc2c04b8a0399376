//! More ways to send a chat request to a [`TestNode`]: with a header of the caller's, or
//! without the node's API key.

use crate::TestNode;

impl TestNode {
    /// [`TestNode::post_chat`] with the header `name: value` added.
    pub async fn post_chat_with_header(
        &self,
        name: &str,
        value: &str,
        body: String,
    ) -> reqwest::Result<reqwest::Response> {
        self.chat_request()
            .header("content-type", "application/json")
            .header(name, value)
            .body(body)
            .send()
            .await
    }

    /// Sends the JSON text `body` to this node's `/v1/chat/completions` with no API key.
    pub async fn post_chat_without_key(&self, body: String) -> reqwest::Result<reqwest::Response> {
        reqwest::Client::new()
            .post(self.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
    }
}

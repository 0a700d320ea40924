//! A minimal tus 1.0 client for tests: each call is one request, its answer returned whole
//! (status, headers), so a test asserts on exactly what the server said.

use reqwest::header::HeaderMap;

/// tus requests against one server.
#[derive(Clone)]
pub struct Tus {
    pub client: reqwest::Client,
    /// `http://host:port`.
    pub base: String,
}

/// One answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// `Upload-Offset` as a number.
    pub fn offset(&self) -> Option<u64> {
        self.header("upload-offset")?.parse().ok()
    }

    /// The JSON error code of the body, if any.
    pub fn code(&self) -> Option<String> {
        let json: serde_json::Value = serde_json::from_str(&self.body).ok()?;
        json["error"]["code"].as_str().map(str::to_owned)
    }

    /// The upload's URL from `Location`.
    pub fn location(&self) -> String {
        self.header("location")
            .unwrap_or_else(|| panic!("no Location in {self:?}"))
            .to_owned()
    }
}

async fn answer(response: reqwest::Result<reqwest::Response>) -> Answer {
    let response = response.expect("the request was answered");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.text().await.unwrap_or_default();
    Answer {
        status,
        headers,
        body,
    }
}

impl Tus {
    pub fn new(client: reqwest::Client, base: &str) -> Self {
        Self {
            client,
            base: base.trim_end_matches('/').to_owned(),
        }
    }

    /// A request with `Tus-Resumable: 1.0.0`.
    pub fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, url)
            .header("Tus-Resumable", "1.0.0")
    }

    /// `POST /files/` with `Upload-Length` and optional `Upload-Metadata`.
    pub async fn create(&self, length: u64, metadata: Option<&str>) -> Answer {
        let mut req = self
            .request(reqwest::Method::POST, &format!("{}/files/", self.base))
            .header("Upload-Length", length.to_string());
        if let Some(m) = metadata {
            req = req.header("Upload-Metadata", m);
        }
        answer(req.send().await).await
    }

    /// `PATCH url` with `bytes` at `offset`.
    pub async fn patch(&self, url: &str, offset: u64, bytes: Vec<u8>) -> Answer {
        answer(self.patch_request(url, offset, bytes).send().await).await
    }

    /// PATCHes `bytes` at `offset`, again while another request holds the upload's append
    /// lease (423), up to `tries` times, `pause` apart. The server refuses such a PATCH
    /// without reading its body, so the refusal can also reach the client as a broken pipe
    /// while it still sends; that is tried again the same way.
    pub async fn patch_when_free(
        &self,
        url: &str,
        offset: u64,
        bytes: &[u8],
        tries: u32,
        pause: std::time::Duration,
    ) -> Answer {
        for _ in 1..tries {
            match self.patch_request(url, offset, bytes.to_vec()).send().await {
                Ok(response) if response.status().as_u16() != 423 => {
                    return answer(Ok(response)).await;
                }
                _ => tokio::time::sleep(pause).await,
            }
        }
        self.patch(url, offset, bytes.to_vec()).await
    }

    pub fn patch_request(&self, url: &str, offset: u64, bytes: Vec<u8>) -> reqwest::RequestBuilder {
        self.request(reqwest::Method::PATCH, url)
            .header("Upload-Offset", offset.to_string())
            .header("Content-Type", "application/offset+octet-stream")
            .body(bytes)
    }

    pub async fn head(&self, url: &str) -> Answer {
        answer(self.request(reqwest::Method::HEAD, url).send().await).await
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> Answer {
        answer(req.send().await).await
    }
}

/// The upload id (its name) at the end of an upload URL.
pub fn id_of(url: &str) -> &str {
    url.rsplit('/').next().unwrap_or(url)
}

//! One HTTP delivery: POST, never follow redirects, bounded in time and in what is read back.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use url::Url;

/// The most of a receiver's response body that is read (and then dropped).
const MAX_RESPONSE_BYTES: usize = 64 << 10;

/// What came of one POST.
#[derive(Debug)]
pub struct Response {
    pub status: Option<u16>,
    pub latency: Duration,
    pub error: Option<String>,
}

pub struct Sender {
    client: reqwest::Client,
    connect_timeout: Duration,
    timeout: Duration,
}

impl Sender {
    pub fn new(connect_timeout: Duration, timeout: Duration) -> anyhow::Result<Self> {
        Ok(Self {
            client: Self::builder(connect_timeout, timeout).build()?,
            connect_timeout,
            timeout,
        })
    }

    fn builder(connect_timeout: Duration, timeout: Duration) -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            // A redirect is a failure: following one could lead anywhere, including inside.
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(connect_timeout)
            .timeout(timeout)
            .user_agent(concat!("Stitch-Webhooks/", env!("CARGO_PKG_VERSION")))
    }

    /// POSTs `body` to `url`. With `pinned`, the connection goes to exactly that address
    /// (the one the SSRF check approved), never to a fresh DNS answer.
    pub async fn post(
        &self,
        url: &Url,
        pinned: Option<(&str, SocketAddr)>,
        headers: Vec<(&'static str, String)>,
        body: Vec<u8>,
    ) -> Response {
        let started = Instant::now();
        let client = match pinned {
            None => self.client.clone(),
            Some((host, addr)) => {
                match Self::builder(self.connect_timeout, self.timeout)
                    .resolve(host, addr)
                    .build()
                {
                    Ok(c) => c,
                    Err(e) => {
                        return Response {
                            status: None,
                            latency: started.elapsed(),
                            error: Some(e.to_string()),
                        };
                    }
                }
            }
        };
        let mut request = client
            .post(url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        match request.send().await {
            Ok(mut response) => {
                let status = response.status().as_u16();
                // Read a little of the body (keeps the connection reusable), never all of it.
                let mut read = 0usize;
                let mut error = None;
                while read < MAX_RESPONSE_BYTES {
                    match response.chunk().await {
                        Ok(Some(chunk)) => read += chunk.len(),
                        Ok(None) => break,
                        Err(e) => {
                            error = Some(format!("reading the response: {e}"));
                            break;
                        }
                    }
                }
                Response {
                    status: Some(status),
                    latency: started.elapsed(),
                    error,
                }
            }
            Err(e) => Response {
                status: None,
                latency: started.elapsed(),
                error: Some(if e.is_timeout() {
                    "timed out".into()
                } else if e.is_connect() {
                    format!("could not connect: {e}")
                } else {
                    e.to_string()
                }),
            },
        }
    }
}

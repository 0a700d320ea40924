//! One HTTP delivery: POST, never follow redirects, bounded in time and in what is read back.
//!
//! Two long-lived clients, so that deliveries to one receiver reuse its connections: one for
//! the operator's endpoints (trusted, resolved by the system), and one for client callbacks
//! whose DNS resolver is the callback policy. Each connection the callback client opens goes
//! to addresses that passed the policy when that connection was opened; a host name whose
//! answer fails it fails the connection with the [`Refusal`], and no connection is made.
//! reqwest does not resolve literal addresses, so those are checked on the URL before
//! sending ([`CallbackPolicy::check_url`]).

use std::error::Error as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use stitch_common::webhooks::callback::{CallbackPolicy, Refusal, Resolve};
use url::Url;

/// The most of a receiver's response body that is read (and then dropped).
const MAX_RESPONSE_BYTES: usize = 64 << 10;

/// What came of one POST.
#[derive(Debug)]
pub struct Response {
    pub status: Option<u16>,
    pub latency: Duration,
    pub error: Option<String>,
    /// The callback policy refused what the host resolved to: nothing was connected to.
    pub refusal: Option<Refusal>,
}

/// Whom a POST is for, and so which client sends it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Receiver {
    /// An operator endpoint.
    Endpoint,
    /// A client callback, whose URL already passed [`CallbackPolicy::check_url`].
    Callback,
}

pub struct Sender {
    endpoints: reqwest::Client,
    /// `None` when client callbacks are not allowed.
    callbacks: Option<reqwest::Client>,
}

impl Sender {
    /// With `callbacks`, a client for client callbacks that resolves host names through
    /// `resolver` and connects only to addresses the policy admits.
    pub fn new(
        connect_timeout: Duration,
        timeout: Duration,
        callbacks: Option<(CallbackPolicy, Arc<dyn Resolve>)>,
    ) -> anyhow::Result<Self> {
        let callbacks = callbacks
            .map(|(policy, resolver)| {
                Self::builder(connect_timeout, timeout)
                    .dns_resolver(PolicyResolver {
                        policy: Arc::new(policy),
                        resolver,
                    })
                    .build()
            })
            .transpose()?;
        Ok(Self {
            endpoints: Self::builder(connect_timeout, timeout).build()?,
            callbacks,
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

    /// POSTs `body` to `url` with the client for `receiver`.
    pub async fn post(
        &self,
        receiver: Receiver,
        url: &Url,
        headers: Vec<(&'static str, String)>,
        body: Vec<u8>,
    ) -> Response {
        let started = Instant::now();
        let client = match receiver {
            Receiver::Endpoint => &self.endpoints,
            Receiver::Callback => match &self.callbacks {
                Some(client) => client,
                None => {
                    return Response {
                        status: None,
                        latency: started.elapsed(),
                        error: Some("client callbacks are not allowed".into()),
                        refusal: None,
                    };
                }
            },
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
                    refusal: None,
                }
            }
            Err(e) => {
                let refusal = refusal_in(&e);
                Response {
                    status: None,
                    latency: started.elapsed(),
                    error: Some(if let Some(refusal) = &refusal {
                        refusal.to_string()
                    } else if e.is_timeout() {
                        "timed out".into()
                    } else if e.is_connect() {
                        format!("could not connect: {e}")
                    } else {
                        e.to_string()
                    }),
                    refusal,
                }
            }
        }
    }
}

/// The callback client's DNS resolver: every answer goes through the callback policy.
struct PolicyResolver {
    policy: Arc<CallbackPolicy>,
    resolver: Arc<dyn Resolve>,
}

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let resolver = self.resolver.clone();
        Box::pin(async move {
            // Port 0: reqwest puts the URL's port in each address.
            let addrs = policy
                .resolve_host(name.as_str(), 0, resolver.as_ref())
                .await?;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The policy's refusal, when that is what failed the connection (reqwest wraps it in its
/// connect error).
fn refusal_in(error: &reqwest::Error) -> Option<Refusal> {
    let mut cause = error.source();
    while let Some(e) = cause {
        if let Some(refusal) = e.downcast_ref::<Refusal>() {
            return Some(refusal.clone());
        }
        cause = e.source();
    }
    None
}

//! The API in-process on port 0, for tests that drive it over HTTP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use stitch_common::config::Settings;
pub use stitch_testkit::*;
use tokio::sync::oneshot;

/// One running API instance.
pub struct TestApp {
    pub addr: SocketAddr,
    pub api: ApiClient,
    pub base: String,
    pub client: reqwest::Client,
    pub env: Arc<TestEnv>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// An API instance on its own namespace and storage.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// An API instance with adjusted settings.
pub async fn spawn_app_with(adjust: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_in(TestEnv::new(), adjust).await
}

/// An API instance in an existing environment (another replica of the same deployment).
pub async fn spawn_in(env: Arc<TestEnv>, adjust: impl FnOnce(&mut Settings)) -> TestApp {
    let mut settings = env.settings();
    adjust(&mut settings);
    settings.validate().expect("test settings are valid");
    let app = stitch_api::Application::build(&settings)
        .await
        .expect("building the app");
    let addr = app.local_addr();
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(app.run_until_stopped(async {
        let _ = rx.await;
    }));
    let api = ApiClient::new(addr);
    TestApp {
        addr,
        base: api.base.clone(),
        client: api.client.clone(),
        api,
        env,
        shutdown: Some(tx),
        task: Some(task),
    }
}

impl TestApp {
    /// Another instance sharing this one's Redis namespace and storage.
    pub async fn sibling(&self) -> TestApp {
        spawn_in(self.env.clone(), |_| {}).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn chunk_request(&self, id: &str, source: &Source, index: u64) -> reqwest::RequestBuilder {
        self.api.chunk_request(id, source, index)
    }

    pub async fn put_chunk(
        &self,
        id: &str,
        source: &Source,
        index: u64,
    ) -> (u16, serde_json::Value) {
        self.api.put_chunk(id, source, index).await
    }

    pub async fn status(&self, id: &str) -> (u16, serde_json::Value) {
        self.api.status(id).await
    }

    /// Stops the instance and waits for it to drain.
    pub async fn stop(mut self) {
        self.stop_now().await;
    }

    async fn stop_now(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

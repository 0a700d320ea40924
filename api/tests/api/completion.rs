//! The completion race: the chunk that completes an upload triggers the merge exactly once,
//! even when the last chunks arrive at once on two instances.

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_completing_chunk_triggers_the_merge_exactly_once_under_a_race() {
    let a = Arc::new(spawn_app().await);
    let b = Arc::new(a.sibling().await);
    let source = Arc::new(Source::random(32 * 1024, 1024, 11));
    let mut conn = redis_connection().expect("Redis");
    for round in 0..25 {
        let id = Arc::new(new_id());
        let permits = Arc::new(Semaphore::new(16));
        let mut tasks = Vec::new();
        // Highest index first, alternating instances, 16 in flight.
        for index in (0..32u64).rev() {
            let permit = permits.clone().acquire_owned().await.unwrap();
            let app = if index % 2 == 0 { a.clone() } else { b.clone() };
            let (id, source) = (id.clone(), source.clone());
            tasks.push(tokio::spawn(async move {
                let result = app.put_chunk(&id, &source, index).await;
                drop(permit);
                result
            }));
        }
        let mut completions = 0;
        for task in tasks {
            let (code, body) = task.await.unwrap();
            assert_eq!(code, 200, "round {round}: {body}");
            if body["upload_complete"] == true {
                completions += 1;
                assert_eq!(body["state"], "merging");
            }
        }
        assert_eq!(
            completions, 1,
            "round {round}: exactly one chunk completed the upload"
        );
        let outbox: Vec<String> = redis::cmd("LRANGE")
            .arg(format!("{}:{{{id}}}:outbox", a.env.namespace))
            .arg(0)
            .arg(-1)
            .query(&mut conn)
            .unwrap();
        assert_eq!(
            outbox.len(),
            1,
            "round {round}: one merge trigger in the outbox"
        );
        let job: serde_json::Value = serde_json::from_str(&outbox[0]).unwrap();
        assert_eq!(job["upload_id"], id.as_str());
        let (_, status) = a.status(&id).await;
        assert_eq!(status["state"], "merging");
        assert_eq!(status["chunks_received"], 32);
    }
}

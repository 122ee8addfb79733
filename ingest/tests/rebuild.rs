//! The collector restarted with changed segment definitions over the same Redis: it serves
//! at once while the rebuild runs in the background, and existing profiles move without new
//! events, with transitions of reason `redefined`; profiles it updates meanwhile are
//! evaluated with the new definitions.

use std::collections::BTreeMap;
use std::time::Duration;

use ingest::Config;
use ingest::config::WriteKey;
use profile_cache::testing::RedisServer;
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const WRITE_KEY: &str = "rebuild-test-key";

/// A collector serving in this process; `stop` shuts it down and checks it ends cleanly.
struct Collector {
    url: String,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Collector {
    async fn start(redis_url: &str, segments: serde_json::Value) -> Collector {
        let config = Config {
            redis_url: redis_url.into(),
            write_keys: vec![WriteKey {
                key: WRITE_KEY.into(),
                origins: vec![],
            }],
            segments: serde_json::from_value(segments).unwrap(),
            shutdown_timeout: Duration::from_secs(5),
            ..Config::default()
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(ingest::serve(config, listener, async move {
            let _ = stopped.await;
        }));
        Collector { url, stop, task }
    }

    async fn stop(self) {
        self.stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the collector stops")
            .unwrap()
            .unwrap();
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Posts `orders` orders of visitor `anon`; the collector must accept them.
async fn post_orders(client: &reqwest::Client, collector: &Collector, anon: &str, orders: u8) {
    let events = (0..orders)
        .map(|n| wire::Event {
            message_id: [n + 1; 16],
            timestamp_ms: now_ms(),
            kind: wire::EventKind::OrderCompleted,
            purpose: wire::Purpose::Analytics,
            order_id: Some(format!("{anon}-{n}")),
            revenue: 1_000,
            ..Default::default()
        })
        .collect();
    let batch = wire::Batch {
        write_key: WRITE_KEY.into(),
        sent_at_ms: now_ms(),
        consent: 0b1111,
        context: wire::Context {
            anonymous_id: Some(anon.into()),
            ..Default::default()
        },
        events,
    };
    for attempt in 0.. {
        match client
            .post(format!("{}/v1/fb", collector.url))
            .body(wire::encode(&batch))
            .send()
            .await
        {
            Ok(res) => {
                assert_eq!(res.status(), reqwest::StatusCode::OK, "{anon}");
                return;
            }
            // The listener is bound before serve starts: only its first accept can lag.
            Err(e) if attempt < 100 => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("{anon}: {e}"),
        }
    }
}

/// `(profile, segment, change, reason)` of every transition, sorted.
async fn transitions(conn: &mut MultiplexedConnection) -> Vec<[String; 4]> {
    let entries: Vec<(String, BTreeMap<String, String>)> = redis::cmd("XRANGE")
        .arg("stream:transitions")
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .unwrap();
    let mut list: Vec<[String; 4]> = entries
        .into_iter()
        .map(|(_, f)| ["profile", "segment", "change", "reason"].map(|k| f[k].clone()))
        .collect();
    list.sort();
    list
}

/// Waits until `meta:{segments}:definitions` names exactly `names`, for at most 10 s.
async fn recorded(conn: &mut MultiplexedConnection, names: &[&str]) {
    for _ in 0..1_000 {
        let record: BTreeMap<String, String> =
            conn.hgetall("meta:{segments}:definitions").await.unwrap();
        if record.keys().map(String::as_str).eq(names.iter().copied()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the definitions {names:?} were not recorded within 10 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_changed_segments_rebuilds_them_while_serving() {
    const VISITORS: usize = 150;
    let redis = RedisServer::start().unwrap();
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let client = reqwest::Client::new();

    let first = Collector::start(
        &redis.url(),
        serde_json::json!([
            {"name": "big", "condition": {"metric": {"field": "orders", "at_least": 2}}},
            {"name": "buyers", "condition": {"metric": {"field": "orders", "at_least": 1}}},
        ]),
    )
    .await;
    for i in 0..VISITORS {
        post_orders(&client, &first, &format!("v{i:03}"), 2).await;
    }
    recorded(&mut conn, &["big", "buyers"]).await;
    first.stop().await;

    // "big" now takes three orders, "buyers" is gone, "recent" is new. A visitor orders
    // three times as soon as the collector is back.
    let second = Collector::start(
        &redis.url(),
        serde_json::json!([
            {"name": "big", "condition": {"metric": {"field": "orders", "at_least": 3}}},
            {"name": "recent", "condition": {"within": {"field": "last_order_at", "duration": "7d"}}},
        ]),
    )
    .await;
    post_orders(&client, &second, "late", 3).await;
    recorded(&mut conn, &["big", "recent"]).await;
    second.stop().await;

    let mut expected = Vec::new();
    let t = |p: &str, s: &str, c: &str, r: &str| [p, s, c, r].map(String::from);
    for i in 0..VISITORS {
        let p = format!("a:v{i:03}");
        expected.push(t(&p, "big", "enter", "event"));
        expected.push(t(&p, "buyers", "enter", "event"));
        expected.push(t(&p, "big", "exit", "redefined"));
        expected.push(t(&p, "buyers", "exit", "removed"));
        expected.push(t(&p, "recent", "enter", "redefined"));
    }
    // The late visitor's update was evaluated with the new definitions; the rebuild found
    // nothing left to change for it.
    expected.push(t("a:late", "big", "enter", "event"));
    expected.push(t("a:late", "recent", "enter", "event"));
    expected.sort();
    assert_eq!(transitions(&mut conn).await, expected);
    let gone: bool = conn.exists("segment:{buyers}:members").await.unwrap();
    assert!(!gone);
    let big: Vec<String> = conn.zrange("segment:{big}:members", 0, -1).await.unwrap();
    assert_eq!(big, ["a:late"]);
    let recent: usize = conn.zcard("segment:{recent}:members").await.unwrap();
    assert_eq!(recent, VISITORS + 1);
}

//! What a message carries (headers, subjects), and a poison message parked
//! after its deliveries.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_and_subjects_are_as_documented() {
    let db = common::TestDb::new("relay_headers").await;
    let store = db.store().await;
    let js = jetstream(&nats_url()).await;
    let suffix = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let stream = format!("HDR_{suffix}");
    let prefix = format!("hdr{suffix}");
    ensure_stream(
        &js,
        &stream,
        vec![format!("{prefix}.>")],
        Duration::from_secs(120),
    )
    .await
    .expect("stream");

    // Invalid settings are refused up front.
    assert!(JetStreamRelay::builder(js.clone(), "x")
        .subject_prefix("bad prefix")
        .build()
        .is_err());
    assert!(JetStreamRelay::builder(js.clone(), "").build().is_err());

    // An event with every optional field, names that need sanitizing...
    let correlation = Uuid::new_v4();
    let causation = Uuid::new_v4();
    let mut full = event(
        "Money.Deposited*",
        serde_json::json!({ "amount": 5, "note": "ä" }),
    );
    full.correlation_id = Some(correlation);
    full.causation_id = Some(causation);
    full.metadata.insert("user".into(), "ann".into());
    full.metadata.insert("k2".into(), "v 2".into());
    let full = store
        .append(AppendRequest {
            aggregate_type: "bank account".into(),
            aggregate_id: "acc 1".into(),
            expected_version: 0,
            events: vec![full],
        })
        .await
        .expect("append")
        .remove(0);
    // ... and a plain one, relayed with a custom subject mapping.
    let plain = store
        .append(AppendRequest {
            aggregate_type: "account".into(),
            aggregate_id: "acc.2".into(),
            expected_version: 0,
            events: vec![event("Opened", serde_json::json!({ "owner": "bo" }))],
        })
        .await
        .expect("append")
        .remove(0);

    let default_relay = JetStreamRelay::builder(js.clone(), "hdr_default")
        .subject_prefix(prefix.clone())
        .filter(outflow::LogFilter::aggregate_types(["bank account"]))
        .build()
        .expect("relay");
    let custom_prefix = prefix.clone();
    let custom_relay = JetStreamRelay::builder(js.clone(), "hdr_custom")
        .subject(move |e: &RecordedEvent| {
            format!(
                "{custom_prefix}.custom.{}.{}",
                subject_token(&e.aggregate_id),
                e.sequence
            )
        })
        .filter(outflow::LogFilter::aggregate_types(["account"]))
        .build()
        .expect("relay");
    assert_eq!(
        default_relay.subject_for(&full),
        format!("{prefix}.bank_account.Money_Deposited_")
    );
    assert_eq!(
        custom_relay.subject_for(&plain),
        format!("{prefix}.custom.acc_2.1")
    );
    let runner = ProjectionRunner::builder(store.clone())
        .projection(ProjectionOptions::new(default_relay).on_error(OnError::Stop))
        .projection(ProjectionOptions::new(custom_relay).on_error(OnError::Stop))
        .build()
        .expect("runner");
    let (stop, task) = common::start_runner(&runner);
    runner
        .wait_for(
            full.checkpoint().max(plain.checkpoint()),
            &["hdr_default", "hdr_custom"],
            Duration::from_secs(30),
        )
        .await
        .expect("relayed");
    stop.cancel();
    task.await.expect("runner task");

    let messages = read_stream(&js, &stream).await;
    assert_eq!(messages.len(), 2);
    let by_id: BTreeMap<String, &async_nats::jetstream::Message> =
        messages.iter().map(|m| (msg_id(m), m)).collect();

    let header_map = |m: &async_nats::Message| -> BTreeMap<String, String> {
        m.headers
            .as_ref()
            .map(|h| {
                h.iter()
                    .map(|(k, v)| {
                        (
                            AsRef::<str>::as_ref(k).to_owned(),
                            v.last().map(|v| v.as_str().to_owned()).unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let recorded_at = |e: &RecordedEvent| {
        // RFC 3339 in UTC with microseconds, as documented.
        e.recorded_at.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
    };

    let m = by_id[&full.event_id.to_string()];
    assert_eq!(
        m.subject.as_str(),
        format!("{prefix}.bank_account.Money_Deposited_")
    );
    let payload: serde_json::Value = serde_json::from_slice(&m.payload).expect("JSON payload");
    assert_eq!(payload, full.payload);
    let expected: BTreeMap<String, String> = [
        ("Nats-Msg-Id", full.event_id.to_string()),
        ("Outflow-Event-Type", "Money.Deposited*".into()),
        ("Outflow-Event-Version", "1".into()),
        ("Outflow-Aggregate-Type", "bank account".into()),
        ("Outflow-Aggregate-Id", "acc 1".into()),
        ("Outflow-Sequence", "1".into()),
        ("Outflow-Position", full.position.to_string()),
        ("Outflow-Transaction-Id", full.transaction_id.to_string()),
        ("Outflow-Recorded-At", recorded_at(&full)),
        ("Outflow-Correlation-Id", correlation.to_string()),
        ("Outflow-Causation-Id", causation.to_string()),
        ("Outflow-Metadata", r#"{"k2":"v 2","user":"ann"}"#.into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(header_map(m), expected);
    assert_eq!(
        JetStreamRelay::headers_for(&full)
            .expect("headers")
            .get_last(headers::EVENT_TYPE)
            .map(|v| v.as_str()),
        Some("Money.Deposited*")
    );

    let m = by_id[&plain.event_id.to_string()];
    assert_eq!(m.subject.as_str(), format!("{prefix}.custom.acc_2.1"));
    let headers = header_map(m);
    assert_eq!(headers["Outflow-Aggregate-Id"], "acc.2");
    assert_eq!(headers["Outflow-Event-Type"], "Opened");
    for absent in [
        "Outflow-Correlation-Id",
        "Outflow-Causation-Id",
        "Outflow-Metadata",
    ] {
        assert!(
            !headers.contains_key(absent),
            "{absent} set without a value"
        );
    }
    assert_eq!(headers.len(), 9);
}

/// Counts how often the poison message was handed to the handler.
struct CountingPoison {
    inner: ApplyOnce,
    poison_calls: Arc<AtomicU32>,
    seen_deliveries: Arc<std::sync::Mutex<Vec<u64>>>,
    fallback_ids: Arc<AtomicBool>,
    handled_ids: Arc<std::sync::Mutex<Vec<String>>>,
    stream: String,
}

#[async_trait::async_trait]
impl MessageHandler<PostgresStore> for CountingPoison {
    async fn handle(
        &self,
        message: &ReceivedMessage,
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), HandlerError> {
        if let Ok(mut ids) = self.handled_ids.lock() {
            ids.push(message.message_id.clone());
        }
        if message.payload == b"poison" {
            self.poison_calls.fetch_add(1, Ordering::SeqCst);
            if let Ok(mut seen) = self.seen_deliveries.lock() {
                seen.push(message.deliveries);
            }
        }
        if message.header(headers::MSG_ID).is_none()
            && message.message_id == format!("{}:{}", self.stream, message.stream_sequence)
        {
            self.fallback_ids.store(true, Ordering::SeqCst);
        }
        self.inner.handle(message, tx).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_message_is_parked_after_max_deliver_and_the_consumer_moves_on() {
    let db = common::TestDb::new("relay_poison").await;
    let store = db.store().await;
    create_effects(store.pool(), "poison_effects").await;
    let js = jetstream(&nats_url()).await;
    let suffix = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let stream = format!("POISON_{suffix}");
    let subject = format!("poison{suffix}.in");
    ensure_stream(
        &js,
        &stream,
        vec![format!("poison{suffix}.>")],
        Duration::from_secs(120),
    )
    .await
    .expect("stream");
    let publish = |id: Option<&str>, payload: &'static [u8]| {
        let js = js.clone();
        let subject = subject.clone();
        let id = id.map(str::to_owned);
        async move {
            let mut headers = async_nats::HeaderMap::new();
            if let Some(id) = id {
                headers.insert(headers::MSG_ID, id.as_str());
            }
            js.publish_with_headers(subject, headers, payload.into())
                .await
                .expect("publish")
                .await
                .expect("ack");
        }
    };
    for (id, payload) in [
        ("m1", &b"ok"[..]),
        ("m2", b"ok"),
        ("m3", b"poison"),
        ("m4", b"ok"),
        ("m5", b"ok"),
    ] {
        publish(Some(id), payload).await;
    }

    let poison_calls = Arc::new(AtomicU32::new(0));
    let seen_deliveries = Arc::new(std::sync::Mutex::new(Vec::new()));
    let fallback_ids = Arc::new(AtomicBool::new(false));
    let handled_ids = Arc::new(std::sync::Mutex::new(Vec::new()));
    let dead_letters = PostgresDeadMessages::new("events").expect("table name");
    let consumer = JetStreamConsumer::builder(
        js.clone(),
        stream.clone(),
        "poison_test",
        store.clone(),
        CountingPoison {
            inner: ApplyOnce {
                table: "poison_effects",
            },
            poison_calls: poison_calls.clone(),
            seen_deliveries: seen_deliveries.clone(),
            fallback_ids: fallback_ids.clone(),
            handled_ids: handled_ids.clone(),
            stream: stream.clone(),
        },
    )
    .dead_letters(dead_letters.clone())
    .filter_subject(format!("poison{suffix}.>"))
    .max_deliver(3)
    .ack_wait(Duration::from_secs(5))
    .pull_expires(Duration::from_secs(2))
    .retry_backoff(Duration::from_millis(50), Duration::from_millis(200))
    .build()
    .expect("consumer");
    let (stop, task) = spawn_consumer(consumer);

    let deadline = Instant::now() + Duration::from_secs(30);
    let parked = loop {
        let parked = dead_letters
            .list(&store, "poison_test")
            .await
            .expect("dead letters");
        let applied = rows(store.pool(), "poison_effects").await;
        if !parked.is_empty() && applied == 4 {
            break parked;
        }
        assert!(
            Instant::now() < deadline,
            "within 30 s: {} parked, {applied} applied",
            parked.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(parked.len(), 1);
    let dead = &parked[0];
    assert_eq!(dead.message_id, "m3");
    assert_eq!(dead.consumer, "poison_test");
    assert_eq!(dead.stream, stream);
    assert_eq!(dead.stream_sequence, 3);
    assert_eq!(dead.subject, subject);
    assert_eq!(dead.payload, b"poison");
    assert_eq!(dead.deliveries, 3, "parked on the third delivery");
    assert!(dead.error.contains("poisoned payload"), "{}", dead.error);
    assert_eq!(
        dead.headers.get("Nats-Msg-Id"),
        Some(&vec!["m3".to_owned()])
    );
    let mut deliveries = seen_deliveries.lock().expect("lock").clone();
    deliveries.dedup();
    assert_eq!(deliveries, [1, 2, 3], "delivered three times, then parked");

    // It is not delivered again, and later messages still flow (one without
    // a message id uses `<stream>:<sequence>` as its inbox key). A message
    // whose id is already in the inbox (committed before, its
    // acknowledgement lost) is acknowledged without calling the handler.
    let calls = poison_calls.load(Ordering::SeqCst);
    sqlx::query("INSERT INTO events_inbox (handler, message_id) VALUES ($1, $2)")
        .bind("poison_test")
        .bind("m0")
        .execute(store.pool())
        .await
        .expect("inbox row");
    publish(Some("m6"), b"ok").await;
    publish(None, b"ok").await;
    publish(Some("m0"), b"ok").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let applied = rows(store.pool(), "poison_effects").await;
        if applied == 6 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{applied} of 6 applied within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(fallback_ids.load(Ordering::SeqCst));
    assert_eq!(
        count(
            store.pool(),
            "SELECT count(*) FROM poison_effects WHERE message_id = $1",
            &format!("{stream}:7"),
        )
        .await,
        1
    );
    let mut durable: PullConsumer = js
        .get_stream(&stream)
        .await
        .expect("stream")
        .get_consumer("poison_test")
        .await
        .expect("consumer");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = durable.info().await.expect("consumer info");
        if info.num_ack_pending == 0 && info.num_pending == 0 && info.ack_floor.stream_sequence == 8
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "messages left unacknowledged after 30 s: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        poison_calls.load(Ordering::SeqCst),
        calls,
        "the parked message came back"
    );
    let handled = handled_ids.lock().expect("lock").clone();
    assert!(
        !handled.iter().any(|id| id == "m0"),
        "the handler ran for a message already in the inbox"
    );
    assert_eq!(
        count(
            store.pool(),
            "SELECT count(*) FROM poison_effects WHERE message_id = $1",
            "m0",
        )
        .await,
        0
    );
    let max_applied: Option<i32> = sqlx::query_scalar("SELECT max(applied) FROM poison_effects")
        .fetch_one(store.pool())
        .await
        .expect("max");
    assert_eq!(max_applied, Some(1));

    // Discarding removes the dead letter.
    assert!(dead_letters
        .discard(&store, dead.id)
        .await
        .expect("discard"));
    assert!(dead_letters
        .list(&store, "poison_test")
        .await
        .expect("list")
        .is_empty());
    stop.cancel();
    task.await.expect("consumer task");
}

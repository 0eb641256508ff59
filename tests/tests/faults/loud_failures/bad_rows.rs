//! Undecodable rows parked by name, or stopping a projection whose policy is
//! stop.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn undecodable_rows_are_parked_by_name_and_their_neighbours_applied() {
    let db = common::TestDb::new("undecodable_park").await;
    let store = db.store().await;

    // Four wallets of three events each; the middle event of each is made
    // undecodable, one kind per wallet.
    let mut written = Vec::new();
    for version in 0..3 {
        for wallet in 0..4 {
            written.push(credit(&store, "wallet", &format!("w{wallet}"), version).await);
        }
    }
    let mut bad = Vec::new();
    for (wallet, (kind, column, value)) in corruptions().into_iter().enumerate() {
        let event = written
            .iter()
            .find(|e| e.aggregate_id == format!("w{wallet}") && e.sequence == 2)
            .expect("the middle event");
        corrupt(&store, column, &value, event.position).await;
        bad.push((kind, event.clone()));
    }
    let last = written.last().expect("events").checkpoint();

    let runner = runner_builder(&store)
        .projection(ProjectionOptions::new(Seen { name: "park" }).retry(QUICK_RETRY))
        .build()
        .expect("runner");
    let (shutdown, handle) = common::start_runner(&runner);
    common::started(&runner, &["park"]).await;

    // Every good event applied, before and after the bad rows.
    let good: Vec<u64> = written
        .iter()
        .filter(|e| !bad.iter().any(|(_, b)| b.position == e.position))
        .map(|e| e.position)
        .collect();
    common::eventually(
        "the good events applied",
        Duration::from_secs(30),
        || async {
            let rows = seen(&store, "park").await;
            let status = common::status_of(&runner, "park").await;
            if rows == good && status.checkpoint >= last {
                Ok(())
            } else {
                Err(format!("{rows:?}; {status:?}"))
            }
        },
    )
    .await;

    // Each bad row parked once, named by its event.
    let parked = runner.dead_letters("park").await.expect("dead letters");
    assert_eq!(parked.len(), bad.len(), "{parked:#?}");
    for (kind, event) in &bad {
        let letter = parked
            .iter()
            .find(|d| d.event_id == event.event_id)
            .unwrap_or_else(|| panic!("{kind}: not parked: {parked:#?}"));
        assert_eq!(letter.event, event.event_ref(), "{kind}");
        assert_eq!(letter.checkpoint, event.checkpoint(), "{kind}");
        assert!(
            letter.error.contains("does not decode"),
            "{kind}: {letter:?}"
        );
    }
    let status = common::status_of(&runner, "park").await;
    assert_eq!(status.parked, bad.len(), "{status:?}");
    assert_eq!(status.lag_events, 0, "{status:?}");

    // Waiting for a bad event's own position reports it; so does waiting
    // for a later one while it was handled during the wait (checked by the
    // first call here: the projection started behind all of them).
    let (_, first_bad) = &bad[0];
    match runner
        .wait_for(first_bad.checkpoint(), &["park"], Duration::from_secs(10))
        .await
    {
        Err(WaitError::Parked {
            projection, event, ..
        }) => {
            assert_eq!(projection, "park");
            assert_eq!(event, first_bad.event_ref());
        }
        other => panic!("expected Parked, got {other:?}"),
    }
    // A later command of its own, with nothing parked: Ok.
    let fresh = credit(&store, "wallet", "w9", 0).await;
    runner
        .wait_for(fresh.checkpoint(), &["park"], Duration::from_secs(10))
        .await
        .expect("nothing parked for the new event");

    // Reading the stream of a bad row fails, naming the same event.
    let error = store
        .read_stream("wallet", "w0", 0, 10)
        .await
        .expect_err("w0 holds a bad row");
    match &error {
        StoreError::Undecodable { event, .. } => assert_eq!(**event, bad[0].1.event_ref()),
        other => panic!("expected Undecodable, got {other:?}"),
    }
    let text = error_chain(&error);
    assert!(
        text.contains("does not decode") && text.contains("escape"),
        "{text}"
    );

    common::stop_runner(shutdown, handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_undecodable_row_stops_a_projection_whose_policy_is_stop() {
    let db = common::TestDb::new("undecodable_stop").await;
    let store = db.store().await;
    let mut written = Vec::new();
    for version in 0..3 {
        written.push(credit(&store, "wallet", "w", version).await);
    }
    corrupt(
        &store,
        "payload",
        r#"{"amount": 1e400}"#,
        written[1].position,
    )
    .await;

    let runner = runner_builder(&store)
        .projection(
            ProjectionOptions::new(Seen { name: "stop" })
                .retry(QUICK_RETRY)
                .on_error(OnError::Stop),
        )
        .build()
        .expect("runner");
    let (shutdown, handle) = common::start_runner(&runner);
    let status =
        common::wait_for_status(&runner, "stop", |s| s.state == ProjectionState::Stopped).await;
    let error = status.last_error.clone().unwrap_or_default();
    assert!(
        error.contains(&written[1].event_ref().to_string()) && error.contains("does not decode"),
        "{status:?}"
    );
    assert_eq!(status.checkpoint, written[0].checkpoint(), "{status:?}");
    assert_eq!(seen(&store, "stop").await, vec![written[0].position]);
    assert!(runner
        .dead_letters("stop")
        .await
        .expect("dead letters")
        .is_empty());
    match runner
        .wait_for(written[2].checkpoint(), &["stop"], Duration::from_secs(10))
        .await
    {
        Err(WaitError::Stopped { projection, error }) => {
            assert_eq!(projection, "stop");
            assert!(error.contains("does not decode"), "{error}");
        }
        other => panic!("expected Stopped, got {other:?}"),
    }
    common::stop_runner(shutdown, handle).await;
}

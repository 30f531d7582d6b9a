//! The dashboard's authentication, CSRF protection and bad-input answers, over HTTP against a
//! real database. (The browser test is `dashboard_browser.rs`.)

mod dashboard_support;

use dashboard_support::{Server, TOKEN, client, csrf_of, login, post_form};
use integration_tests::{TestDb, fresh_db};
use reqwest::header;

async fn dead_letter(db: &TestDb, body: &str) -> i64 {
    let id: i64 = sqlx::query_scalar(
        "SELECT outbox.enqueue(exchange => '', routing_key => 'nowhere', payload => convert_to($1, 'UTF8'))",
    )
    .bind(body)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    outbox_relay::claim::dead_letter(&mut conn, &[id], &["NO_ROUTE"])
        .await
        .unwrap();
    id
}

/// (dead letters with this id, outbox rows with this id)
async fn where_is(db: &TestDb, id: i64) -> (i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM outbox.dead_letters WHERE id = $1), \
                (SELECT count(*) FROM outbox.messages WHERE id = $1)",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn pages_without_a_login_or_token_are_401() {
    let db = fresh_db().await;
    let server = Server::start(&db, None).await;
    let id = dead_letter(&db, "secret payload").await;

    for path in [
        "/dashboard".to_owned(),
        format!("/dashboard/relay-dead/{id}"),
    ] {
        let resp = client().get(server.url(&path)).send().await.unwrap();
        assert_eq!(resp.status(), 401, "{path}");
        assert_eq!(
            resp.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        assert!(!resp.text().await.unwrap().contains("secret payload"));
    }
    // A browser is shown the login form, still with 401.
    let resp = client()
        .get(server.url("/dashboard"))
        .header(header::ACCEPT, "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert!(resp.text().await.unwrap().contains("name=token"));

    // A forged cookie and a wrong bearer token are refused too.
    let forged = "relay_dashboard=v1.99999999999.00112233445566778899aabbccddeeff.00";
    let resp = client()
        .get(server.url("/dashboard"))
        .header(header::COOKIE, forged)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401, "forged cookie");
    let resp = client()
        .get(server.url("/dashboard"))
        .bearer_auth("not-the-token-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401, "wrong bearer token");

    // The wrong token does not log in.
    let (status, _, body) = post_form(
        &server,
        "/dashboard/login",
        None,
        "token=wrong-token-0123456789abc",
        &[],
    )
    .await;
    assert_eq!(status, 401);
    assert!(body.contains("not the relay"));

    // The right ones do.
    let resp = client()
        .get(server.url("/dashboard"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.unwrap().contains(&id.to_string()));
    let cookie = login(&server).await;
    let resp = client()
        .get(server.url(&format!("/dashboard/relay-dead/{id}")))
        .header(header::COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.unwrap().contains("secret payload"));
}

/// (what, session cookie, form body, extra headers, expected status)
type Refused<'a> = (
    &'a str,
    Option<&'a str>,
    String,
    Vec<(&'a str, &'a str)>,
    u16,
);

#[tokio::test]
async fn refused_actions_change_nothing() {
    let db = fresh_db().await;
    let server = Server::start(&db, None).await;
    let id = dead_letter(&db, "keep me").await;
    let path = format!("/dashboard/relay-dead/{id}/redrive");
    let cookie = login(&server).await;
    let csrf = csrf_of(&server, &cookie).await;
    let other_csrf = csrf_of(&server, &login(&server).await).await;
    assert_ne!(csrf, other_csrf, "each session has its own token");
    let good = format!("csrf={csrf}");

    let refused: [Refused; 7] = [
        ("no session", None, good.clone(), vec![], 401),
        (
            "bearer token instead of a session",
            None,
            good.clone(),
            vec![("authorization", "Bearer dashboard-test-token-0123456789")],
            401,
        ),
        ("no csrf token", Some(&cookie), String::new(), vec![], 422),
        (
            "wrong csrf token",
            Some(&cookie),
            "csrf=00ff".into(),
            vec![],
            403,
        ),
        (
            "another session's csrf token",
            Some(&cookie),
            format!("csrf={other_csrf}"),
            vec![],
            403,
        ),
        (
            "cross-site origin",
            Some(&cookie),
            good.clone(),
            vec![("origin", "http://evil.example")],
            403,
        ),
        (
            "cross-site fetch",
            Some(&cookie),
            good.clone(),
            vec![("sec-fetch-site", "cross-site")],
            403,
        ),
    ];
    for (what, cookie, body, extra, want) in refused {
        let (status, ct, detail) = post_form(&server, &path, cookie, &body, &extra).await;
        assert_eq!(status, want, "{what}: {detail}");
        assert_eq!(ct, "application/problem+json", "{what}");
        assert_eq!(where_is(&db, id).await, (1, 0), "{what} changed something");
    }

    // The same request from the dashboard's own page goes through.
    let origin = format!("http://{}", server.addr);
    let (status, _, _) = post_form(
        &server,
        &path,
        Some(&cookie),
        &good,
        &[("origin", &origin), ("sec-fetch-site", "same-origin")],
    )
    .await;
    assert_eq!(status, 303);
    assert_eq!(where_is(&db, id).await, (0, 1), "redriven into the outbox");
}

#[tokio::test]
async fn bad_ids_and_forms_get_problem_json() {
    let db = fresh_db().await;
    let server = Server::start(&db, None).await;
    let cookie = login(&server).await;
    let csrf = format!("csrf={}", csrf_of(&server, &cookie).await);
    let before: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM outbox.messages) + (SELECT count(*) FROM outbox.dead_letters)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();

    let cases: [(&str, String, u16, &str); 9] = [
        ("/dashboard/relay-dead/abc/redrive", csrf.clone(), 400, "id"),
        (
            "/dashboard/relay-dead/12345/redrive",
            csrf.clone(),
            404,
            "12345",
        ),
        (
            "/dashboard/consumer-dead/12345/replay",
            csrf.clone(),
            404,
            "12345",
        ),
        (
            "/dashboard/consumer-dead/1e3/replay",
            csrf.clone(),
            400,
            "id",
        ),
        (
            "/dashboard/notifications/12345/resend",
            csrf.clone(),
            404,
            "12345",
        ),
        (
            "/dashboard/prepared/12345/resolve",
            format!("{csrf}&decision=commit"),
            404,
            "12345",
        ),
        (
            "/dashboard/prepared/12345/resolve",
            format!("{csrf}&decision=maybe"),
            422,
            "decision",
        ),
        (
            "/dashboard/prepared/12345/resolve",
            csrf.clone(),
            422,
            "decision",
        ),
        ("/dashboard/relay-dead/1/redrive", "%%%".into(), 422, "csrf"),
    ];
    for (path, body, want, names) in cases {
        let (status, ct, detail) = post_form(&server, path, Some(&cookie), &body, &[]).await;
        assert_eq!(status, want, "{path} {body}: {detail}");
        assert_eq!(ct, "application/problem+json", "{path}");
        let doc: serde_json::Value = serde_json::from_str(&detail).unwrap();
        assert_eq!(doc["status"], want);
        assert!(
            doc["detail"].as_str().unwrap().contains(names),
            "{path}: detail should name {names}: {detail}"
        );
    }
    for path in [
        "/dashboard/relay-dead/x",
        "/dashboard/consumer-dead/99999",
        "/dashboard/notifications/-",
    ] {
        let resp = client()
            .get(server.url(path))
            .header(header::COOKIE, &cookie)
            .send()
            .await
            .unwrap();
        assert!(matches!(resp.status().as_u16(), 400 | 404), "{path}");
        assert_eq!(
            resp.headers()[header::CONTENT_TYPE],
            "application/problem+json",
            "{path}"
        );
    }
    let after: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM outbox.messages) + (SELECT count(*) FROM outbox.dead_letters)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(before, after);
}

#[tokio::test]
async fn replay_resolve_and_resend_do_what_their_cli_and_api_do() {
    let db = fresh_db().await;
    let server = Server::start(&db, None).await;
    let cookie = login(&server).await;
    let csrf = format!("csrf={}", csrf_of(&server, &cookie).await);

    // A consumer dead letter goes back onto its queue, and is marked replayed.
    let queue = integration_tests::TestQueue::new("dashboard-replay").await;
    let row: i64 = sqlx::query_scalar(
        "INSERT INTO inbox.compensation_log (consumer, queue, message_id, exchange, routing_key, \
             payload, attempts, reason, last_error) \
         VALUES ('c', $1, 77, '', $1, convert_to('again', 'UTF8'), 3, 'exhausted', 'boom') \
         RETURNING id",
    )
    .bind(&queue.name)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let path = format!("/dashboard/consumer-dead/{row}/replay");
    let (status, _, body) = post_form(&server, &path, Some(&cookie), &csrf, &[]).await;
    assert_eq!(status, 303, "{body}");
    let got = queue.wait_for(1, std::time::Duration::from_secs(10)).await;
    assert_eq!(got[0].payload, b"again");
    assert_eq!(got[0].message_id.as_deref(), Some("77"));
    let (status, _, _) = post_form(&server, &path, Some(&cookie), &csrf, &[]).await;
    assert_eq!(status, 404, "a replayed row is not replayed twice");
    queue.delete().await;

    // A prepared message is committed into the outbox; rolling it back afterwards is a 409.
    let prepared: i64 = sqlx::query_scalar(
        "INSERT INTO outbox.prepared_messages (exchange, routing_key, payload, state) \
         VALUES ('', 'q', 'x', 'unresolved') RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let path = format!("/dashboard/prepared/{prepared}/resolve");
    let (status, _, _) = post_form(
        &server,
        &path,
        Some(&cookie),
        &format!("{csrf}&decision=commit"),
        &[],
    )
    .await;
    assert_eq!(status, 303);
    let (status, ct, _) = post_form(
        &server,
        &path,
        Some(&cookie),
        &format!("{csrf}&decision=rollback"),
        &[],
    )
    .await;
    assert_eq!((status, ct.as_str()), (409, "application/problem+json"));
    let in_outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox.messages WHERE id = $1")
        .bind(prepared)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(in_outbox, 1);

    // An exhausted notification is put back on a fresh schedule, due now.
    sqlx::query(
        "SELECT notify.upsert_endpoint('ep', 'http://127.0.0.1:9/', 'secret-0123456789abcdef')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let n: i64 = sqlx::query_scalar("SELECT notify.send('ep', 'e.v', '{}')")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE notify.notifications SET status = 'exhausted', next_attempt_at = NULL, \
             exhausted_at = now(), attempts = 3, step = 3 WHERE id = $1",
    )
    .bind(n)
    .execute(&db.pool)
    .await
    .unwrap();
    let (status, _, _) = post_form(
        &server,
        &format!("/dashboard/notifications/{n}/resend"),
        Some(&cookie),
        &csrf,
        &[],
    )
    .await;
    assert_eq!(status, 303);
    let (state, step, due): (String, i32, bool) = sqlx::query_as(
        "SELECT status, step, next_attempt_at <= now() FROM notify.notifications WHERE id = $1",
    )
    .bind(n)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((state.as_str(), step, due), ("pending", 0, true));
}

//! The dashboard's POSTs. Each one checks, in this order: session (401), origin (403), form
//! (422), CSRF token (403), id (400); only then does it call the same function as the CLI or API
//! that does the job, and answers 303 back to the overview, or a problem document.

use axum::Form;
use axum::extract::rejection::FormRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use consumer_lib::broker::{BrokerUrls, Connector};
use lapin::options::ConfirmSelectOptions;
use outbox::MessageId;
use outbox::prepared::{Decision, PreparedError};
use serde::Deserialize;

use super::{Dashboard, Operator, Problem, csrf, parse_id, same_origin};

/// The form every action posts.
#[derive(Debug, Deserialize)]
pub(crate) struct ActionForm {
    csrf: String,
    /// `commit` or `rollback`, for resolve.
    decision: Option<String>,
}

/// The login form.
#[derive(Debug, Deserialize)]
pub(crate) struct LoginForm {
    token: String,
}

fn form<T>(form: Result<Form<T>, FormRejection>) -> Result<T, Problem> {
    form.map(|Form(f)| f).map_err(|rejection| {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "malformed form",
            format!(
                "expected an application/x-www-form-urlencoded form with field `csrf`: {}",
                rejection.body_text()
            ),
        )
    })
}

/// Session, origin, form and CSRF checks shared by every action; gives the parsed form and id.
fn checked(
    state: &Dashboard,
    operator: &Operator,
    raw_id: &str,
    f: Result<Form<ActionForm>, FormRejection>,
) -> Result<(ActionForm, i64), Problem> {
    let f = form(f)?;
    operator.check_csrf(state, &f.csrf)?;
    let id = parse_id(raw_id)?;
    Ok((f, id))
}

fn done(what: &str, id: i64, section: &str) -> Response {
    Redirect::to(&format!("/dashboard?done={what}&id={id}#{section}")).into_response()
}

/// `POST /dashboard/relay-dead/{id}/redrive`: back into the outbox (`outbox-relay dead redrive`).
pub(crate) async fn redrive(
    State(state): State<Dashboard>,
    operator: Operator,
    Path(raw_id): Path<String>,
    f: Result<Form<ActionForm>, FormRejection>,
) -> Result<Response, Problem> {
    let (_, id) = checked(&state, &operator, &raw_id, f)?;
    let moved = crate::admin::redrive(&state.pool, &[id])
        .await
        .map_err(Problem::unavailable)?;
    if moved == 0 {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "unknown dead letter",
            format!("no relay dead letter with id {id}"),
        ));
    }
    tracing::info!(message_id = id, "dead letter redriven from the dashboard");
    Ok(done("redriven", id, "relay-dead"))
}

/// `POST /dashboard/consumer-dead/{id}/replay`: back onto the consumer's queue
/// (`consumer-dead replay`).
pub(crate) async fn replay(
    State(state): State<Dashboard>,
    operator: Operator,
    Path(raw_id): Path<String>,
    f: Result<Form<ActionForm>, FormRejection>,
) -> Result<Response, Problem> {
    let (_, id) = checked(&state, &operator, &raw_id, f)?;
    // Known before connecting: an unknown id is a 404 even while the broker is down.
    match consumer_lib::dead_letter::get(&state.pool, id).await {
        Ok(Some(row)) if row.replayed_at.is_none() => {}
        Ok(_) => {
            return Err(Problem::new(
                StatusCode::NOT_FOUND,
                "unknown dead letter",
                format!("no waiting consumer dead letter with id {id}"),
            ));
        }
        Err(err) => return Err(Problem::unavailable(err)),
    }
    // A connection per replay, as the CLI does: replays are rare and a held connection would
    // be one more thing to keep alive.
    // `amqp_url` may list several nodes: the first that answers takes the replay.
    let urls = BrokerUrls::parse(&state.amqp_url).map_err(Problem::unavailable)?;
    let connection = Connector::new(urls, "outbox-relay dashboard")
        .connect()
        .await
        .map_err(Problem::unavailable)?
        .connection;
    let result = async {
        let channel = connection.create_channel().await?;
        // Confirms: replay marks the row only after the broker has the message.
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok::<_, lapin::Error>(channel)
    }
    .await;
    let outcome = match result {
        Ok(channel) => consumer_lib::dead_letter::replay(&state.pool, &channel, id).await,
        Err(err) => {
            let _ = connection.close(200, "done".into()).await;
            return Err(Problem::unavailable(err));
        }
    };
    let _ = connection.close(200, "done".into()).await;
    match outcome {
        Ok(row) => {
            tracing::info!(dead_letter = id, queue = %row.queue, "consumer dead letter replayed from the dashboard");
            Ok(done("replayed", id, "consumer-dead"))
        }
        Err(consumer_lib::Error::DeadLetterNotFound { .. }) => Err(Problem::new(
            StatusCode::NOT_FOUND,
            "unknown dead letter",
            format!("no waiting consumer dead letter with id {id}"),
        )),
        Err(err) => Err(Problem::unavailable(err)),
    }
}

/// `POST /dashboard/prepared/{id}/resolve` with `decision=commit|rollback`
/// (`outbox-relay prepared resolve`).
pub(crate) async fn resolve(
    State(state): State<Dashboard>,
    operator: Operator,
    Path(raw_id): Path<String>,
    f: Result<Form<ActionForm>, FormRejection>,
) -> Result<Response, Problem> {
    let (f, id) = checked(&state, &operator, &raw_id, f)?;
    let decision: Decision = f.decision.as_deref().unwrap_or("").parse().map_err(|_| {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid decision",
            "decision must be `commit` or `rollback`",
        )
    })?;
    match crate::prepared::checkback::resolve(&state.pool, MessageId(id), decision).await {
        Ok(()) => Ok(done(
            match decision {
                Decision::Committed => "committed",
                Decision::RolledBack => "rolled_back",
            },
            id,
            "prepared",
        )),
        Err(PreparedError::NotFound(_)) => Err(Problem::new(
            StatusCode::NOT_FOUND,
            "unknown prepared message",
            format!("no prepared message with id {id}"),
        )),
        Err(PreparedError::Conflict { decided, .. }) => Err(Problem::new(
            StatusCode::CONFLICT,
            "already decided",
            format!("prepared message {id} was already {decided}"),
        )),
        Err(err) => Err(Problem::unavailable(err)),
    }
}

/// `POST /dashboard/notifications/{id}/resend`: a fresh schedule, due now (the notifier API's
/// re-send).
pub(crate) async fn resend(
    State(state): State<Dashboard>,
    operator: Operator,
    Path(raw_id): Path<String>,
    f: Result<Form<ActionForm>, FormRejection>,
) -> Result<Response, Problem> {
    let (_, id) = checked(&state, &operator, &raw_id, f)?;
    match notifier::store::resend(&state.pool, id).await {
        Ok(true) => {
            tracing::info!(notification_id = id, "re-send requested from the dashboard");
            Ok(done("resent", id, "notifications"))
        }
        Ok(false) => Err(Problem::new(
            StatusCode::NOT_FOUND,
            "unknown notification",
            format!("no notification with id {id}"),
        )),
        Err(err) => Err(Problem::unavailable(err)),
    }
}

/// `POST /dashboard/login` with `token=<admin token>`: sets the session cookie.
pub(crate) async fn login(
    State(state): State<Dashboard>,
    headers: HeaderMap,
    f: Result<Form<LoginForm>, FormRejection>,
) -> Result<Response, Problem> {
    // A forged cross-site login would put the victim in the attacker's session.
    same_origin(&headers)?;
    let f = form(f)?;
    if !state.token_matches(&f.token) {
        tracing::warn!("dashboard login refused: wrong token");
        return Ok((
            StatusCode::UNAUTHORIZED,
            super::pages::login_page(Some("That is not the relay's admin token.")),
        )
            .into_response());
    }
    let (_, value) = state.keys.issue(super::now());
    let cookie = format!(
        "{}={value}; Path=/dashboard; HttpOnly; SameSite=Strict; Max-Age={}",
        csrf::COOKIE,
        csrf::SESSION_SECONDS
    );
    Ok(([(header::SET_COOKIE, cookie)], Redirect::to("/dashboard")).into_response())
}

/// `POST /dashboard/logout`: clears the cookie.
pub(crate) async fn logout(
    State(state): State<Dashboard>,
    operator: Operator,
    f: Result<Form<ActionForm>, FormRejection>,
) -> Result<Response, Problem> {
    let f = form(f)?;
    operator.check_csrf(&state, &f.csrf)?;
    let cookie = format!(
        "{}=; Path=/dashboard; HttpOnly; SameSite=Strict; Max-Age=0",
        csrf::COOKIE
    );
    Ok((
        [(header::SET_COOKIE, cookie)],
        Redirect::to("/dashboard/login"),
    )
        .into_response())
}

//! `consumer-dead`: list and replay the messages consumers gave up on (the compensation log).

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use consumer_lib::broker::{BrokerUrls, Connector, redact_url};
use consumer_lib::dead_letter::{self, DeadLetter};
use lapin::options::ConfirmSelectOptions;
use sqlx::postgres::PgPoolOptions;

#[derive(Parser)]
#[command(
    name = "consumer-dead",
    about = "List and replay consumer dead letters"
)]
struct Cli {
    /// PostgreSQL holding the inbox schema.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    database_url: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Dead letters waiting for a decision, newest first.
    List {
        /// Only this consumer's.
        #[arg(long)]
        consumer: Option<String>,
        /// Include those already replayed.
        #[arg(long)]
        all: bool,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One dead letter in full, payload included.
    Show {
        /// Its id (from `list`).
        id: i64,
    },
    /// Publish dead letters back to their consumer's queue with a fresh attempt count.
    Replay {
        /// Ids to replay (from `list`).
        ids: Vec<i64>,
        /// Replay every waiting dead letter of this consumer instead.
        #[arg(long, conflicts_with = "ids")]
        consumer: Option<String>,
        /// The broker to publish to: one AMQP URL, or the nodes of a cluster separated by
        /// commas (the first that answers is used).
        #[arg(
            long,
            env = "AMQP_URL",
            default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
        )]
        amqp_url: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&cli.database_url)
        .await
        .with_context(|| format!("connect to DATABASE_URL {}", redact_url(&cli.database_url)))?;
    match cli.command {
        Command::List {
            consumer,
            all,
            limit,
            json,
        } => {
            if limit < 1 {
                bail!("--limit must be at least 1");
            }
            let rows = dead_letter::list(&pool, consumer.as_deref(), all, limit)
                .await
                .context("list dead letters (did `outbox-relay migrate` run?)")?;
            if json {
                for row in &rows {
                    println!("{}", to_json(row, false));
                }
            } else {
                println!(
                    "{:>8}  {:<20}  {:>20}  {:<11}  {:>8}  {:<25}  error",
                    "id", "consumer", "message_id", "reason", "attempts", "dead_lettered_at"
                );
                for row in &rows {
                    println!(
                        "{:>8}  {:<20}  {:>20}  {:<11}  {:>8}  {:<25}  {}{}",
                        row.id,
                        row.consumer,
                        row.message_id.map_or("-".to_owned(), |id| id.to_string()),
                        row.reason,
                        row.attempts,
                        row.dead_lettered_at.to_rfc3339(),
                        one_line(&row.last_error),
                        if row.replayed_at.is_some() {
                            " (replayed)"
                        } else {
                            ""
                        },
                    );
                }
            }
        }
        Command::Show { id } => {
            let row = dead_letter::get(&pool, id)
                .await
                .context("read dead letter")?
                .with_context(|| format!("no dead letter with id {id}"))?;
            println!("{}", serde_json::to_string_pretty(&to_json(&row, true))?);
        }
        Command::Replay {
            ids,
            consumer,
            amqp_url,
        } => {
            let ids = match consumer {
                Some(consumer) => dead_letter::list(&pool, Some(&consumer), false, i64::MAX)
                    .await
                    .context("list dead letters")?
                    .into_iter()
                    .rev()
                    .map(|row| row.id)
                    .collect(),
                None if ids.is_empty() => bail!("give the ids to replay, or --consumer NAME"),
                None => ids,
            };
            let urls = BrokerUrls::parse(&amqp_url).context("AMQP_URL / --amqp-url")?;
            let connection = Connector::new(urls, "consumer-dead")
                .connect()
                .await
                .context("connect to AMQP_URL")?
                .connection;
            let channel = connection.create_channel().await.context("open channel")?;
            // Confirms: a row is marked replayed only after the broker has the message.
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .context("enable publisher confirms")?;
            let mut failed = 0;
            for id in ids {
                match dead_letter::replay(&pool, &channel, id).await {
                    Ok(row) => println!("replayed {id} to queue {}", row.queue),
                    Err(err) => {
                        failed += 1;
                        eprintln!("replay {id} failed: {err}");
                    }
                }
            }
            let _ = connection.close(200, "done".into()).await;
            if failed > 0 {
                bail!("{failed} replay(s) failed");
            }
        }
    }
    Ok(())
}

fn one_line(text: &str) -> String {
    let line: String = text.chars().take(120).collect();
    line.replace('\n', " ")
}

fn to_json(row: &DeadLetter, with_payload: bool) -> serde_json::Value {
    let mut value = serde_json::json!({
        "id": row.id,
        "consumer": row.consumer,
        "queue": row.queue,
        "message_id": row.message_id,
        "exchange": row.exchange,
        "routing_key": row.routing_key,
        "headers": row.headers,
        "content_type": row.content_type,
        "ordering_key": row.ordering_key,
        "attempts": row.attempts,
        "reason": row.reason,
        "last_error": row.last_error,
        "dead_lettered_at": row.dead_lettered_at,
        "replayed_at": row.replayed_at,
    });
    if with_payload {
        value["payload"] = match std::str::from_utf8(&row.payload) {
            Ok(text) => serde_json::Value::String(text.to_owned()),
            Err(_) => {
                serde_json::Value::String(format!("<{} bytes, not UTF-8>", row.payload.len()))
            }
        };
    }
    value
}

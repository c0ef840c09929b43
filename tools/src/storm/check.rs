//! After the storm: every hold confirmed, the queue drained, and the
//! invariants checked against the service and, given `--store`, the
//! database itself.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use anyhow::Context;
use futures::StreamExt;
use tonic::{metadata::MetadataValue, transport::Channel, Code, Request, Status};

use stockgate::{
    domain::Sku,
    pb::{
        inventory_service_client::InventoryServiceClient, ConfirmReservationRequest,
        GetReservationRequest, GetStockRequest, ReservationState as PbState, ReserveOutcome,
    },
};

use super::{
    back_off, metadata, status, user_name, Admin, Answer, Call, Check, StormOptions, StormReport,
};

/// Confirms the holds, waits for the queue, then checks the invariants.
pub(super) async fn confirm_and_check(
    options: &StormOptions,
    admin: &mut Admin,
    channel: &Channel,
    answers: &[Call],
    earlier: i64,
    report: &mut StormReport,
) -> anyhow::Result<()> {
    // Reservations by idempotency key (call index): a double click must
    // come back with one reservation.
    let mut by_key: HashMap<usize, HashSet<&str>> = HashMap::new();
    for (i, _, answer, _) in answers {
        if let Answer::Outcome {
            outcome: ReserveOutcome::Reserved | ReserveOutcome::Queued,
            reservation: Some(id),
        } = answer
        {
            by_key.entry(*i).or_default().insert(id.as_str());
        }
    }
    let doubled_keys: Vec<usize> = by_key
        .iter()
        .filter(|(_, ids)| ids.len() > 1)
        .map(|(i, _)| *i)
        .collect();
    let pairs: HashSet<usize> = answers
        .iter()
        .filter(|(_, second, _, _)| *second)
        .map(|(i, _, _, _)| *i)
        .collect();
    report.deduplicated = pairs
        .iter()
        .filter(|i| by_key.get(i).is_some_and(|ids| ids.len() == 1))
        .filter(|i| {
            answers
                .iter()
                .filter(|(j, _, a, _)| {
                    j == *i
                        && matches!(
                            a,
                            Answer::Outcome {
                                reservation: Some(_),
                                ..
                            }
                        )
                })
                .count()
                == 2
        })
        .count();
    let owners: HashMap<&str, usize> = by_key
        .iter()
        .flat_map(|(i, ids)| ids.iter().map(move |id| (*id, *i)))
        .collect();
    report.admitted = owners.len();

    // Finish: wait for every admitted reservation to leave QUEUED, confirm
    // the holds. Anything still QUEUED after the wait was lost. Many at
    // once: with rate limiting on, each user's calls are paced.
    let inventory = InventoryServiceClient::new(channel.clone());
    let deadline = Instant::now() + Duration::from_secs(120);
    let finished: Vec<anyhow::Result<(String, PbState, u32)>> =
        futures::stream::iter(owners.iter().map(|(id, i)| {
            let user = user_name(options, *i);
            confirm_when_held(inventory.clone(), (*id).to_owned(), user, deadline)
        }))
        .buffer_unordered(64)
        .collect()
        .await;
    let mut lost = Vec::new();
    let mut units_confirmed: i64 = 0;
    for result in finished {
        let (id, state, quantity) = result?;
        match state {
            PbState::Confirmed => {
                report.confirmed += 1;
                units_confirmed += i64::from(quantity);
            }
            PbState::Rejected => report.rejected += 1,
            other => lost.push(format!("{id}: {other:?}")),
        }
    }
    let view = loop {
        let view = admin
            .client
            .get_stock(admin.request(GetStockRequest {
                sku: options.sku.clone(),
            }))
            .await
            .map_err(status("GetStock"))?
            .into_inner()
            .stock
            .context("GetStock without stock")?;
        if view.queued_units == 0 || Instant::now() > deadline {
            break view;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let ordered = view.held_units + view.confirmed_units - earlier;
    report.units_ordered = ordered;
    report.oversold = (ordered - options.stock).max(0);
    let mut checks = vec![
        Check {
            name: "units ordered <= stock",
            ok: ordered <= options.stock,
            detail: format!("{ordered} ordered of {}", options.stock),
        },
        Check {
            name: "stock left = stock - units ordered",
            ok: view.db_stock == options.stock - ordered,
            detail: format!(
                "{} left, {} - {ordered} = {}",
                view.db_stock,
                options.stock,
                options.stock - ordered
            ),
        },
        Check {
            name: "every admitted reservation confirmed or rejected",
            ok: lost.is_empty() && report.confirmed + report.rejected == report.admitted,
            detail: if lost.is_empty() {
                format!(
                    "{} admitted: {} confirmed, {} rejected",
                    report.admitted, report.confirmed, report.rejected
                )
            } else {
                format!("not finished: {}", lost.join(", "))
            },
        },
        Check {
            name: "callers' confirmed units = units ordered",
            ok: units_confirmed == ordered,
            detail: format!("{units_confirmed} confirmed by callers, {ordered} in the database"),
        },
        Check {
            name: "one reservation per idempotency key",
            ok: doubled_keys.is_empty(),
            detail: if doubled_keys.is_empty() {
                format!(
                    "{} double clicks, {} answered with one reservation",
                    pairs.len(),
                    report.deduplicated
                )
            } else {
                format!("{} keys got two reservations", doubled_keys.len())
            },
        },
    ];
    if let Some(gate) = view.gate_stock {
        checks.push(Check {
            name: "gate agrees with the database",
            ok: gate == view.db_stock,
            detail: format!("gate {gate}, database {}", view.db_stock),
        });
    }
    let checked = admin
        .client
        .check_invariants(admin.request(stockgate::pb::CheckInvariantsRequest {
            sku: options.sku.clone(),
        }))
        .await
        .map_err(status("CheckInvariants"))?
        .into_inner();
    let problems: Vec<String> = checked
        .skus
        .into_iter()
        .flat_map(|s| s.problems)
        .chain(checked.problems)
        .collect();
    checks.push(Check {
        name: "the service's invariant checker",
        ok: checked.ok,
        detail: if problems.is_empty() {
            format!(
                "nothing disagrees (gate compared: {})",
                if checked.gate_compared { "yes" } else { "no" }
            )
        } else {
            problems.join("; ")
        },
    });
    if let Some(url) = &options.store {
        checks.extend(check_database(url, options, &owners).await?);
    }
    report.checks = checks;
    Ok(())
}

/// Retries a call refused by the rate limiter or the shedder, after the
/// hint it came with.
async fn paced<T, F, Fut>(mut call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    loop {
        match call().await {
            Err(s) if s.code() == Code::ResourceExhausted => {
                back_off(&s, Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

/// Waits for one reservation to leave QUEUED and confirms it if HELD;
/// returns its final state and units.
async fn confirm_when_held(
    client: InventoryServiceClient<Channel>,
    id: String,
    user: String,
    deadline: Instant,
) -> anyhow::Result<(String, PbState, u32)> {
    let user = metadata(&user, "user")?;
    fn as_user<T>(body: T, user: &MetadataValue<tonic::metadata::Ascii>) -> Request<T> {
        let mut request = Request::new(body);
        request.metadata_mut().insert("x-user-id", user.clone());
        request
    }
    let reservation = loop {
        let got = paced(|| {
            let mut client = client.clone();
            let request = as_user(
                GetReservationRequest {
                    reservation_id: id.clone(),
                },
                &user,
            );
            async move { client.get_reservation(request).await }
        })
        .await
        .map_err(status("GetReservation"))?
        .into_inner()
        .reservation
        .context("GetReservation without a reservation")?;
        if got.state() != PbState::Queued || Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    if reservation.state() != PbState::Held {
        return Ok((id, reservation.state(), reservation.quantity));
    }
    let confirmed = paced(|| {
        let mut client = client.clone();
        let request = as_user(
            ConfirmReservationRequest {
                reservation_id: id.clone(),
            },
            &user,
        );
        async move { client.confirm_reservation(request).await }
    })
    .await
    .map_err(status("ConfirmReservation"))?
    .into_inner()
    .reservation
    .context("ConfirmReservation without a reservation")?;
    Ok((id, confirmed.state(), confirmed.quantity))
}

/// The same invariants read from the database itself; `owners` are the
/// reservations callers were told about.
pub async fn check_database(
    url: &str,
    options: &StormOptions,
    owners: &HashMap<&str, usize>,
) -> anyhow::Result<Vec<Check>> {
    // `owners` maps reservation id to the call that got it.
    let target = stockgate::config::StoreBackend::Postgres(url.to_owned());
    let store =
        stockgate::store::Store::connect(target, &stockgate::config::StoreConfig::default())?;
    let sku = Sku::parse(&options.sku).map_err(|e| anyhow::anyhow!("--sku: {e}"))?;
    let rows = store.reservations_of(&sku).await?;
    let left = store
        .inventory(&sku)
        .await?
        .map(|row| row.stock)
        .context("the SKU is not in the database")?;
    let ordered: i64 = rows
        .iter()
        .filter(|r| r.state.holds_units())
        .map(|r| i64::from(r.quantity))
        .sum();
    let unknown: Vec<&str> = rows
        .iter()
        .map(|r| r.id.as_str())
        .filter(|id| !owners.contains_key(id))
        .collect();
    Ok(vec![
        Check {
            name: "database: units ordered <= stock",
            ok: ordered <= options.stock,
            detail: format!("{ordered} ordered in {} rows", rows.len()),
        },
        Check {
            name: "database: stock left = stock - units ordered",
            ok: left == options.stock - ordered,
            detail: format!("{left} left"),
        },
        Check {
            name: "database: no order a caller was not told about",
            ok: unknown.is_empty(),
            detail: format!("{} unknown rows", unknown.len()),
        },
    ])
}

/// Database writes the service attempted so far, from `/metrics`.
pub(super) async fn db_writes(options: &StormOptions) -> Option<u64> {
    let url = options.metrics_url.as_deref()?;
    let text = fetch(url).await.ok()?;
    let total: f64 = text
        .lines()
        .filter(|l| l.starts_with(stockgate::metrics::DECISIONS) && l.contains("layer=\"db\""))
        // A write attempted: a commit, or a conditional update that lost
        // its race. Sold out and over cap are decided by the read.
        .filter(|l| l.contains("decision=\"committed\"") || l.contains("decision=\"conflict\""))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    Some(total as u64)
}

/// A plain HTTP/1.0 GET (the metrics endpoint is plain HTTP).
async fn fetch(url: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url
        .strip_prefix("http://")
        .context("--metrics must be an http:// URL")?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut stream = tokio::net::TcpStream::connect(host).await?;
    stream
        .write_all(format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    Ok(body)
}

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
        StockView,
    },
};

use super::{
    back_off, metadata, sale::Sale, status, user_name, Admin, Answer, Call, Check, SkuTally,
    StormOptions, StormReport, HOTTEST,
};

/// Confirms the holds, waits for the queue, then checks the invariants,
/// each for every SKU of the sale (`earlier`: each SKU's units ordered
/// before this run).
pub(super) async fn confirm_and_check(
    options: &StormOptions,
    sale: &Sale,
    admin: &mut Admin,
    channel: &Channel,
    answers: &[Call],
    earlier: &[i64],
    report: &mut StormReport,
) -> anyhow::Result<()> {
    let opens_at = report
        .opens_at
        .as_deref()
        .map(chrono::DateTime::parse_from_rfc3339)
        .transpose()
        .context("the report's opening")?;
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
    let finished: Vec<anyhow::Result<Finished>> =
        futures::stream::iter(owners.iter().map(|(id, i)| {
            let user = user_name(options, *i);
            confirm_when_held(inventory.clone(), (*id).to_owned(), user, deadline)
        }))
        .buffer_unordered(64)
        .collect()
        .await;
    let skus = sale.names.len();
    let mut lost = Vec::new();
    let mut units_confirmed = vec![0i64; skus];
    let mut before_opening = Vec::new();
    for result in finished {
        let (id, state, quantity, created_at) = result?;
        if let Some(opens_at) = opens_at {
            let created = created_at
                .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32));
            if created.is_none_or(|created| created < opens_at.to_utc()) {
                before_opening.push(format!("{id} at {created:?}"));
            }
        }
        match state {
            PbState::Confirmed => {
                report.confirmed += 1;
                units_confirmed[sale.of_call[owners[id.as_str()]]] += i64::from(quantity);
            }
            PbState::Rejected => report.rejected += 1,
            other => lost.push(format!("{id}: {other:?}")),
        }
    }
    let views: Vec<StockView> = sale.each_sku(|sku| drained(admin, sku, deadline)).await?;
    let ordered: Vec<i64> = views
        .iter()
        .zip(earlier)
        .map(|(view, earlier)| view.held_units + view.confirmed_units - earlier)
        .collect();
    let stock = options.stock;
    let total: i64 = ordered.iter().sum();
    report.units_ordered = total;
    report.oversold = ordered.iter().map(|o| (o - stock).max(0)).sum();
    report.hottest = hottest(sale, answers, &owners, &ordered, &views);
    let each = |f: &dyn Fn(usize) -> (bool, String)| (0..skus).map(f).collect::<Vec<_>>();
    let mut checks = vec![
        over_skus(
            "units ordered <= stock",
            sale,
            each(&|k| {
                (
                    ordered[k] <= stock,
                    format!("{} ordered of {stock}", ordered[k]),
                )
            }),
            format!("{total} ordered of {}", stock * skus as i64),
        ),
        over_skus(
            "stock left = stock - units ordered",
            sale,
            each(&|k| {
                let left = views[k].db_stock;
                (
                    left == stock - ordered[k],
                    format!(
                        "{left} left, {stock} - {} = {}",
                        ordered[k],
                        stock - ordered[k]
                    ),
                )
            }),
            format!("{} left", views.iter().map(|v| v.db_stock).sum::<i64>()),
        ),
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
        over_skus(
            "callers' confirmed units = units ordered",
            sale,
            each(&|k| {
                (
                    units_confirmed[k] == ordered[k],
                    format!(
                        "{} confirmed by callers, {} in the database",
                        units_confirmed[k], ordered[k]
                    ),
                )
            }),
            format!(
                "{} confirmed by callers, {total} in the database",
                units_confirmed.iter().sum::<i64>()
            ),
        ),
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
    if let Some(opens_at) = opens_at {
        checks.push(Check {
            name: "nothing admitted before the opening",
            ok: before_opening.is_empty(),
            detail: if before_opening.is_empty() {
                format!(
                    "{} admitted at or after {}",
                    report.admitted,
                    opens_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                )
            } else {
                format!(
                    "{} admitted before the opening, e.g. {}",
                    before_opening.len(),
                    before_opening[..before_opening.len().min(3)].join(", ")
                )
            },
        });
    }
    let gated: Vec<usize> = (0..skus)
        .filter(|k| views[*k].gate_stock.is_some())
        .collect();
    if !gated.is_empty() {
        checks.push(over_skus(
            "gate agrees with the database",
            sale,
            each(&|k| match views[k].gate_stock {
                Some(gate) => (
                    gate == views[k].db_stock,
                    format!("gate {gate}, database {}", views[k].db_stock),
                ),
                None => (true, "no gate counter".into()),
            }),
            format!("{} SKUs with a gate counter", gated.len()),
        ));
    }
    let checked: Vec<stockgate::pb::CheckInvariantsResponse> = sale
        .each_sku(|sku| {
            let (mut client, admin) = (admin.client.clone(), &*admin);
            async move {
                client
                    .check_invariants(
                        admin.request(stockgate::pb::CheckInvariantsRequest { sku: sku.clone() }),
                    )
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(status("CheckInvariants"))
            }
        })
        .await?;
    let gate_compared = checked.iter().any(|c| c.gate_compared);
    let problems: Vec<String> = checked
        .iter()
        .flat_map(|c| c.skus.iter().flat_map(|s| s.problems.clone()))
        .chain(checked.iter().flat_map(|c| c.problems.clone()))
        .collect();
    checks.push(Check {
        name: "the service's invariant checker",
        ok: checked.iter().all(|c| c.ok),
        detail: if problems.is_empty() {
            format!(
                "nothing disagrees (gate compared: {})",
                if gate_compared { "yes" } else { "no" }
            )
        } else {
            problems.join("; ")
        },
    });
    if let Some(url) = &options.store {
        let store = open_database(url)?;
        let mut each = Vec::with_capacity(skus);
        for sku in &sale.names {
            each.push(check_database(&store, sku, stock, &owners).await?);
        }
        for (i, name) in DATABASE_CHECKS.iter().enumerate() {
            let results = each
                .iter()
                .map(|checks| (checks[i].ok, checks[i].detail.clone()))
                .collect();
            checks.push(over_skus(name, sale, results, String::new()));
        }
    }
    report.checks = checks;
    Ok(())
}

/// One SKU's stock view once its queue has drained (or the deadline passed).
async fn drained(admin: &Admin, sku: &str, deadline: Instant) -> anyhow::Result<StockView> {
    let mut client = admin.client.clone();
    loop {
        let view = client
            .get_stock(admin.request(GetStockRequest {
                sku: sku.to_owned(),
            }))
            .await
            .map_err(status("GetStock"))?
            .into_inner()
            .stock
            .context("GetStock without stock")?;
        if view.queued_units == 0 || Instant::now() > deadline {
            return Ok(view);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One check over every SKU: it holds if it holds for each. A one-SKU
/// sale's detail is that SKU's; otherwise the totals, and the first SKU it
/// fails for.
fn over_skus(name: &'static str, sale: &Sale, each: Vec<(bool, String)>, totals: String) -> Check {
    let failing: Vec<usize> = (0..each.len()).filter(|k| !each[*k].0).collect();
    let detail = if each.len() == 1 {
        each[0].1.clone()
    } else {
        let totals = if totals.is_empty() {
            String::new()
        } else {
            format!("{totals}; ")
        };
        match failing.first() {
            Some(k) => format!(
                "{totals}fails for {} of {} SKUs, first {}: {}",
                failing.len(),
                each.len(),
                sale.names[*k],
                each[*k].1
            ),
            None => format!("{totals}holds for each of {} SKUs", each.len()),
        }
    };
    Check {
        name,
        ok: failing.is_empty(),
        detail,
    }
}

/// The SKUs that drew the most calls, with what became of them.
fn hottest(
    sale: &Sale,
    answers: &[Call],
    owners: &HashMap<&str, usize>,
    ordered: &[i64],
    views: &[StockView],
) -> Vec<SkuTally> {
    let mut tallies: Vec<SkuTally> = sale
        .names
        .iter()
        .enumerate()
        .map(|(k, sku)| SkuTally {
            sku: sku.clone(),
            calls: 0,
            admitted: 0,
            sold_out: 0,
            units_ordered: ordered[k],
            stock_left: views[k].db_stock,
        })
        .collect();
    for (i, _, answer, _) in answers {
        let tally = &mut tallies[sale.of_call[*i]];
        tally.calls += 1;
        if let Answer::Outcome {
            outcome: ReserveOutcome::SoldOut,
            ..
        } = answer
        {
            tally.sold_out += 1;
        }
    }
    for i in owners.values() {
        tallies[sale.of_call[*i]].admitted += 1;
    }
    tallies.sort_by(|a, b| b.calls.cmp(&a.calls).then_with(|| a.sku.cmp(&b.sku)));
    tallies.truncate(HOTTEST);
    tallies
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

/// A reservation at the end: id, final state, units, when it was decided.
type Finished = (String, PbState, u32, Option<prost_types::Timestamp>);

/// Waits for one reservation to leave QUEUED and confirms it if HELD;
/// returns its final state and units.
async fn confirm_when_held(
    client: InventoryServiceClient<Channel>,
    id: String,
    user: String,
    deadline: Instant,
) -> anyhow::Result<Finished> {
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
        return Ok((
            id,
            reservation.state(),
            reservation.quantity,
            reservation.created_at,
        ));
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
    Ok((
        id,
        confirmed.state(),
        confirmed.quantity,
        confirmed.created_at,
    ))
}

/// The names of [`check_database`]'s checks, in its order.
const DATABASE_CHECKS: [&str; 3] = [
    "database: units ordered <= stock",
    "database: stock left = stock - units ordered",
    "database: no order a caller was not told about",
];

/// The PostgreSQL database at `url`, for [`check_database`]: one pool
/// serves every SKU of the sale.
pub fn open_database(url: &str) -> anyhow::Result<stockgate::store::Store> {
    let target = stockgate::config::StoreBackend::Postgres(url.to_owned());
    Ok(stockgate::store::Store::connect(
        target,
        &stockgate::config::StoreConfig::default(),
    )?)
}

/// The same invariants read from the database itself for one SKU of
/// `stock` units; `owners` are the reservations callers were told about
/// (reservation id to the call that got it).
pub async fn check_database(
    store: &stockgate::store::Store,
    sku: &str,
    stock: i64,
    owners: &HashMap<&str, usize>,
) -> anyhow::Result<Vec<Check>> {
    let sku = Sku::parse(sku).map_err(|e| anyhow::anyhow!("--sku: {e}"))?;
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
            name: DATABASE_CHECKS[0],
            ok: ordered <= stock,
            detail: format!("{ordered} ordered in {} rows", rows.len()),
        },
        Check {
            name: DATABASE_CHECKS[1],
            ok: left == stock - ordered,
            detail: format!("{left} left"),
        },
        Check {
            name: DATABASE_CHECKS[2],
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sale(skus: usize) -> Sale {
        let options = StormOptions {
            sku: "S".into(),
            skus,
            requests: 1,
            ..StormOptions::default()
        };
        Sale::new(&options, 1).unwrap()
    }

    #[test]
    fn a_check_over_skus_fails_for_any_one_and_names_it() {
        let each = |bad: Option<usize>| {
            (0..4)
                .map(|k| (Some(k) != bad, format!("detail {k}")))
                .collect::<Vec<_>>()
        };
        let held = over_skus("c", &sale(4), each(None), "4 in all".into());
        assert!(held.ok);
        assert_eq!(held.detail, "4 in all; holds for each of 4 SKUs");
        let failed = over_skus("c", &sale(4), each(Some(3)), "4 in all".into());
        assert!(!failed.ok);
        assert_eq!(
            failed.detail,
            "4 in all; fails for 1 of 4 SKUs, first S-0003: detail 3"
        );
        let one = over_skus("c", &sale(1), vec![(false, "its own".into())], "x".into());
        assert_eq!((one.ok, one.detail.as_str()), (false, "its own"));
    }
}

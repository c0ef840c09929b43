//! What `stockgate admin` prints: plain tables, one function per answer.

use std::fmt::Write as _;

use stockgate::pb::{self, DbCheckMode, GateFailureMode, Layers};

/// Columns padded to their widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        let _ = writeln!(out, "{}", padded.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

fn onoff(b: bool) -> String {
    if b { "on" } else { "off" }.into()
}

fn db_check_name(mode: i32) -> String {
    match DbCheckMode::try_from(mode) {
        Ok(DbCheckMode::Optimistic) => "optimistic",
        Ok(DbCheckMode::Pessimistic) => "pessimistic",
        Ok(DbCheckMode::Off) => "OFF (naive, can oversell)",
        _ => "?",
    }
    .into()
}

fn failure_name(mode: i32) -> &'static str {
    match GateFailureMode::try_from(mode) {
        Ok(GateFailureMode::FailClosed) => "fail_closed",
        Ok(GateFailureMode::Bypass) => "bypass",
        _ => "?",
    }
}

pub(super) fn render_switches(layers: &Layers) -> String {
    let rates = layers.rate_limits.unwrap_or_default();
    let rows = vec![
        vec![
            "rate_limit".into(),
            onoff(layers.rate_limit),
            format!(
                "shadow {}; per user 1 per {} ms, burst {}; global {}/s, burst {}",
                onoff(layers.rate_limit_shadow),
                rates.per_user_period_ms,
                rates.per_user_burst,
                rates.global_per_sec,
                rates.global_burst
            ),
        ],
        vec!["dedup".into(), onoff(layers.dedup), String::new()],
        vec![
            "gate".into(),
            onoff(layers.gate),
            format!("on failure: {}", failure_name(layers.gate_failure_mode)),
        ],
        vec!["queue".into(), onoff(layers.queue), String::new()],
        vec![
            "db_check".into(),
            db_check_name(layers.db_check),
            String::new(),
        ],
    ];
    table(&["layer", "state", "detail"], &rows)
}

fn short(layers: &Option<Layers>) -> Vec<String> {
    match layers {
        None => vec!["?".into(); 5],
        Some(l) => vec![
            onoff(l.rate_limit),
            onoff(l.dedup),
            format!("{} ({})", onoff(l.gate), failure_name(l.gate_failure_mode)),
            onoff(l.queue),
            db_check_name(l.db_check),
        ],
    }
}

fn time(at: &Option<prost_types::Timestamp>) -> String {
    at.as_ref()
        .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
        .map_or_else(|| "-".into(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string())
}

pub(super) fn render_layers(answer: &pb::GetLayersResponse) -> String {
    let mut out = format!(
        "replica {} runs revision {} (newest stored: {})\n\n",
        answer.replica, answer.revision, answer.stored_revision
    );
    out.push_str(&render_switches(&answer.layers.unwrap_or_default()));
    if !answer.replicas.is_empty() {
        out.push('\n');
        let rows: Vec<Vec<String>> = answer
            .replicas
            .iter()
            .map(|r| {
                let mut row = vec![r.replica.clone(), r.revision.to_string(), time(&r.seen_at)];
                row.extend(short(&r.layers));
                row
            })
            .collect();
        out.push_str(&table(
            &[
                "replica",
                "revision",
                "seen (UTC)",
                "rate_limit",
                "dedup",
                "gate",
                "queue",
                "db_check",
            ],
            &rows,
        ));
    }
    out
}

pub(super) fn render_stock(view: &pb::StockView) -> String {
    let gate = view
        .gate_stock
        .map_or_else(|| "-".into(), |g| g.to_string());
    table(
        &[
            "sku",
            "db_stock",
            "gate_stock",
            "held",
            "confirmed",
            "queued",
            "max_per_user",
            "sold_out",
            "waitlisted",
            "window (UTC)",
            "sale",
            "version",
        ],
        &[vec![
            view.sku.clone(),
            view.db_stock.to_string(),
            gate,
            view.held_units.to_string(),
            view.confirmed_units.to_string(),
            view.queued_units.to_string(),
            view.max_per_user.to_string(),
            match view.sold_out_policy() {
                pb::SoldOutPolicy::Waitlist => format!("waitlist (limit {})", view.waitlist_limit),
                _ => "instant".into(),
            },
            view.waitlisted_units.to_string(),
            match (&view.opens_at, &view.closes_at, view.draw_window_ms) {
                (None, None, _) => "-".into(),
                (opens, closes, 0) => format!("{} to {}", time(opens), time(closes)),
                (opens, closes, draw) => {
                    format!("{} to {}, draw {draw} ms", time(opens), time(closes))
                }
            },
            match view.sale_id.as_str() {
                "" => "-".into(),
                sale => sale.to_owned(),
            },
            view.db_version.to_string(),
        ]],
    )
}

/// A draw as `stockgate admin draw` prints it, and whether re-running it
/// here from its seed and entrants (each user held to `max_per_user`)
/// gives the same places and outcomes as the gate's.
pub(super) fn render_draw(
    draw: &pb::GetDrawResponse,
    max_per_user: u32,
    list: bool,
) -> (String, bool) {
    use stockgate::gate::{draw::first_difference, DrawEntrant};
    let entrants: Vec<DrawEntrant> = draw.entrants.iter().map(DrawEntrant::from).collect();
    let outcome_name = |outcome: pb::DrawOutcome| match outcome {
        pb::DrawOutcome::Admitted => "admitted",
        pb::DrawOutcome::SoldOut => "sold out",
        pb::DrawOutcome::UserLimitReached => "over the limit",
        pb::DrawOutcome::Withdrawn => "withdrawn",
        pb::DrawOutcome::Unspecified => "-",
    };
    let mut out = format!(
        "sku {}: draw from {} to {} (UTC), seed {}
",
        draw.sku,
        time(&draw.opens_at),
        time(&draw.closes_at),
        draw.seed
    );
    let admitted: Vec<&pb::DrawEntrant> = draw
        .entrants
        .iter()
        .filter(|e| e.outcome() == pb::DrawOutcome::Admitted)
        .collect();
    let _ = writeln!(
        out,
        "{} entrants ({} more while it was full), {}",
        draw.entrant_count,
        draw.overflow,
        match &draw.drawn_at {
            None => "not drawn yet".to_owned(),
            Some(_) => format!(
                "drawn at {} from {} units: {} admitted ({} units)",
                time(&draw.drawn_at),
                draw.stock_at_draw,
                admitted.len(),
                admitted.iter().map(|e| u64::from(e.quantity)).sum::<u64>()
            ),
        }
    );
    let mut agrees = true;
    if draw.drawn_at.is_some() {
        let first_difference =
            first_difference(&draw.seed, draw.stock_at_draw, max_per_user, &entrants);
        match first_difference {
            None => out
                .push_str("re-run from the seed and the entrants: the same places and outcomes\n"),
            Some((e, (place, outcome))) => {
                agrees = false;
                let _ = writeln!(
                    out,
                    "re-run differs at {}: the gate drew it {} ({:?}), the re-run {place} ({outcome:?}); a user holding units before the draw, or a sale's cap, explains an outcome but never a place",
                    e.id, e.drawn, e.outcome
                );
            }
        }
    }
    if list {
        let rows: Vec<Vec<String>> = draw
            .entrants
            .iter()
            .map(|e| {
                vec![
                    e.arrival.to_string(),
                    e.drawn.to_string(),
                    e.reservation_id.clone(),
                    e.user_id.clone(),
                    e.quantity.to_string(),
                    outcome_name(e.outcome()).to_owned(),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&table(
            &[
                "arrival",
                "drawn",
                "reservation",
                "user",
                "quantity",
                "outcome",
            ],
            &rows,
        ));
    }
    (out, agrees)
}

pub(super) fn render_sale(sale: &pb::Sale) -> String {
    let cap = match sale.max_per_user {
        0 => "none".to_owned(),
        cap => cap.to_string(),
    };
    table(
        &["sale", "max_per_user", "skus"],
        &[vec![sale.sale_id.clone(), cap, sale.skus.join(",")]],
    )
}

pub(super) fn render_reservations(rows: &[pb::Reservation]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.reservation_id.clone(),
                r.sku.clone(),
                r.user_id.clone(),
                r.quantity.to_string(),
                r.state()
                    .as_str_name()
                    .trim_start_matches("RESERVATION_STATE_")
                    .to_ascii_lowercase(),
                time(&r.created_at),
                r.cart_id.clone(),
                r.reject_reason.clone(),
            ]
        })
        .collect();
    table(
        &[
            "reservation",
            "sku",
            "user",
            "qty",
            "state",
            "created (UTC)",
            "cart",
            "reason",
        ],
        &rows,
    )
}

pub(super) fn render_check(answer: &pb::CheckInvariantsResponse) -> String {
    let gate = |v: Option<i64>| v.map_or_else(|| "-".into(), |v| v.to_string());
    let rows: Vec<Vec<String>> = answer
        .skus
        .iter()
        .map(|s| {
            vec![
                s.sku.clone(),
                s.supplied.to_string(),
                s.db_stock.to_string(),
                s.held_units.to_string(),
                s.confirmed_units.to_string(),
                gate(s.gate_stock),
                gate(s.gate_in_flight),
                if s.problems.is_empty() {
                    std::iter::once("ok".to_owned())
                        .chain(s.notes.iter().map(|n| format!("note: {n}")))
                        .collect::<Vec<_>>()
                        .join("; ")
                } else {
                    s.problems.join("; ")
                },
            ]
        })
        .collect();
    let mut out = table(
        &[
            "sku",
            "supplied",
            "db_stock",
            "held",
            "confirmed",
            "gate",
            "in_flight",
            "check",
        ],
        &rows,
    );
    let backlog = answer
        .queue_backlog
        .map_or_else(|| "unknown".into(), |b| b.to_string());
    let _ = writeln!(
        out,
        "queue backlog: {backlog}; gate compared: {}",
        if answer.gate_compared {
            "yes"
        } else {
            "no (gate off or queue not drained)"
        }
    );
    for problem in &answer.problems {
        let _ = writeln!(out, "problem: {problem}");
    }
    out
}

pub(super) fn render_audit(events: &[pb::AuditEvent]) -> String {
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            vec![
                e.id.to_string(),
                time(&e.at),
                e.actor.clone(),
                e.action.clone(),
                e.outcome.clone(),
                e.reason.clone(),
                e.after.clone(),
            ]
        })
        .collect();
    table(
        &[
            "id", "at (UTC)", "actor", "action", "outcome", "reason", "after",
        ],
        &rows,
    )
}

pub(super) fn render_dead_letters(answer: &pb::ListDeadLettersResponse) -> String {
    let rows: Vec<Vec<String>> = answer
        .dead_letters
        .iter()
        .map(|d| {
            vec![
                d.key.clone(),
                d.sku.clone(),
                d.user_id.clone(),
                d.quantity.to_string(),
                time(&d.dead_lettered_at),
                d.error.clone(),
            ]
        })
        .collect();
    let mut out = format!(
        "{} in the dead-letter queue; the first {}:\n",
        answer.depth,
        answer.dead_letters.len()
    );
    out.push_str(&table(
        &["key", "sku", "user", "qty", "set aside (UTC)", "error"],
        &rows,
    ));
    out
}

pub(super) fn render_moved(verb: &str, moved: &pb::DeadLettersMoved) -> String {
    let mut out = format!("{verb} {} messages", moved.keys.len());
    for key in &moved.keys {
        out.push_str(&format!("\n  {key}"));
    }
    if !moved.not_found.is_empty() {
        out.push_str(&format!("\nnot found: {}", moved.not_found.join(", ")));
    }
    out.push_str(&format!(
        "\n{} left in the dead-letter queue\n",
        moved.remaining
    ));
    out
}

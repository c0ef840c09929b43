//! `stockgate admin …`: a thin command-line client of AdminService for
//! operators and game-day runbooks. It prints plain tables; errors come back
//! as the server's status code and message.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand};
use tonic::{
    metadata::MetadataValue,
    service::interceptor::InterceptedService,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
    Request, Status,
};

mod render;

pub use render::table;
use render::{
    render_audit, render_check, render_dead_letters, render_layers, render_moved,
    render_reservations, render_sale, render_stock, render_switches,
};
use stockgate::pb::{
    self, admin_service_client::AdminServiceClient, DbCheckMode, GateFailureMode, Layers,
    RateLimitSettings, SetLayersRequest,
};

#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The admin endpoint (`admin.listen`, or `server.listen` when shared);
    /// https:// needs `--ca-cert`.
    #[arg(
        long,
        global = true,
        env = "STOCKGATE_ADMIN_ADDR",
        default_value = "http://127.0.0.1:50051"
    )]
    pub addr: String,
    /// The admin token (`admin.token` of the server).
    #[arg(
        long,
        global = true,
        env = "STOCKGATE_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Your name for the audit trail.
    #[arg(long, global = true, env = "USER", default_value = "unknown")]
    pub operator: String,
    /// PEM CA certificate that signed the server's TLS certificate.
    #[arg(long, global = true)]
    pub ca_cert: Option<PathBuf>,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Show the layer switches (this replica and the fleet), or change them.
    Layers {
        #[command(subcommand)]
        change: Option<LayersCommand>,
    },
    /// Read or change a SKU's stock.
    Stock {
        #[command(subcommand)]
        command: StockCommand,
    },
    /// Read or change a sale: SKUs sharing one per-user cap.
    Sale {
        #[command(subcommand)]
        command: SaleCommand,
    },
    /// List reservations in the database.
    Reservations {
        #[command(subcommand)]
        command: ReservationsCommand,
    },
    /// The newest audit events (switch changes, refusals).
    Audit {
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Check the invariants (every SKU, or one); exits 1 when one is
    /// broken, printing what disagrees.
    Check {
        #[arg(long)]
        sku: Option<String>,
    },
    /// The orders the processor gave up on (RabbitMQ's dead-letter queue).
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// A SKU's fair-opening draw: its seed and entrants, re-run here from
    /// them and compared with what the gate decided; exits 1 when they
    /// disagree.
    Draw {
        sku: String,
        /// Also list every entrant (arrival, place drawn, outcome).
        #[arg(long)]
        entrants: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum SaleCommand {
    /// The sale's cap and SKUs.
    Show { sale_id: String },
    /// Create or change a sale; the SKUs listed make it up afterwards.
    Set {
        sale_id: String,
        /// Most units one user may hold or have bought across the sale's
        /// SKUs (0 = no cap).
        #[arg(long)]
        max_per_user: u32,
        /// Every SKU of the sale, comma-separated; `--skus ""` empties it.
        #[arg(long, value_delimiter = ',', required = true)]
        skus: Vec<String>,
        /// Why, for the audit trail (required).
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// The first messages, with why each was given up.
    List {
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Send messages back to the order queue (after fixing the cause).
    Redrive {
        #[command(flatten)]
        which: DlqSelection,
        /// With `--all`: most messages to take (0 = the server's 100).
        #[arg(long, default_value_t = 0, requires = "all")]
        limit: u32,
        /// Why, for the audit trail.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Delete messages for good.
    Purge {
        #[command(flatten)]
        which: DlqSelection,
        /// With `--all`: most messages to take (0 = the server's 100).
        #[arg(long, default_value_t = 0, requires = "all")]
        limit: u32,
        /// Why, for the audit trail (required).
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct DlqSelection {
    /// Keys as `dlq list` shows them (repeat for several).
    #[arg(long = "key")]
    keys: Vec<String>,
    /// The first `--limit` messages instead.
    #[arg(long)]
    all: bool,
}

fn selection(which: DlqSelection, limit: u32) -> pb::DeadLetterSelection {
    pb::DeadLetterSelection {
        keys: which.keys,
        all: which.all,
        limit,
    }
}

#[derive(Debug, Subcommand)]
pub enum LayersCommand {
    /// `set gate=off db_check=pessimistic …`. Keys: rate_limit,
    /// rate_limit.shadow, rate_limit.per_user_period_ms,
    /// rate_limit.per_user_burst, rate_limit.global_per_sec,
    /// rate_limit.global_burst, dedup, gate, gate.failure_mode
    /// (fail_closed|bypass), queue, db_check (optimistic|pessimistic|off).
    Set {
        /// key=value pairs.
        #[arg(required = true)]
        assignments: Vec<String>,
        /// Apply even if nothing would be left to stop an oversell.
        #[arg(long)]
        force: bool,
        /// Why, for the audit trail.
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum StockCommand {
    /// A SKU's stock as the database and the gate see it.
    Get { sku: String },
    /// Create a SKU or overwrite its available stock.
    Set {
        sku: String,
        stock: i64,
        /// Most units one user may hold (0 = no limit).
        #[arg(long, default_value_t = 0)]
        max_per_user: u32,
    },
    /// Add (or, negative, remove) units.
    Adjust {
        sku: String,
        #[arg(allow_hyphen_values = true)]
        delta: i64,
    },
    /// What the SKU answers once sold out: `instant` or `waitlist`.
    Policy {
        sku: String,
        policy: String,
        /// Most entries waiting at once (0 = the server's default).
        #[arg(long, default_value_t = 0)]
        waitlist_limit: u32,
    },
    /// Set the sale window: Reserve admits from `--opens-at` until
    /// `--closes-at` (RFC 3339, e.g. 2026-12-24T18:00:00Z); a side left
    /// out stays open, both left out clear the window. `--draw-ms` makes
    /// the opening fair: calls in its first milliseconds enter a draw.
    Window {
        sku: String,
        #[arg(long)]
        opens_at: Option<String>,
        #[arg(long)]
        closes_at: Option<String>,
        #[arg(long, default_value_t = 0)]
        draw_ms: u32,
        /// Why, for the audit trail (required).
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ReservationsCommand {
    /// Newest first.
    List {
        #[arg(long)]
        sku: Option<String>,
        /// waitlisted, held, confirmed, released, expired or rejected.
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
}

/// Adds the credential and the operator's name to every call.
type AddMetadata = Box<dyn FnMut(Request<()>) -> Result<Request<()>, Status> + Send>;
type Client = AdminServiceClient<InterceptedService<Channel, AddMetadata>>;

async fn client(args: &AdminArgs) -> anyhow::Result<Client> {
    let mut endpoint = Endpoint::from_shared(args.addr.clone())
        .with_context(|| format!("--addr {}", args.addr))?;
    if args.addr.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &args.ca_cert {
            let pem = std::fs::read(ca).with_context(|| format!("--ca-cert {}", ca.display()))?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        endpoint = endpoint.tls_config(tls)?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach {}", args.addr))?;
    let bearer = args
        .token
        .as_ref()
        .map(|t| MetadataValue::try_from(format!("Bearer {t}")))
        .transpose()
        .context("--token must be visible ASCII")?;
    let operator = MetadataValue::try_from(args.operator.as_str())
        .context("--operator must be visible ASCII")?;
    let add: AddMetadata = Box::new(move |mut request: Request<()>| {
        if let Some(bearer) = &bearer {
            request
                .metadata_mut()
                .insert("authorization", bearer.clone());
        }
        request
            .metadata_mut()
            .insert(stockgate::grpc::OPERATOR_METADATA, operator.clone());
        Ok(request)
    });
    Ok(AdminServiceClient::with_interceptor(channel, add))
}

/// Runs one command; returns what to print.
/// A SKU's draw read whole, page by page: ask for [`DrawPages::next`]
/// with any client until it says `None`, [`DrawPages::add`]ing each
/// answer.
pub struct DrawPages {
    sku: String,
    draw: Option<pb::GetDrawResponse>,
}

impl DrawPages {
    pub fn new(sku: &str) -> Self {
        Self {
            sku: sku.to_owned(),
            draw: None,
        }
    }

    /// The next page to ask for; `None` once every entrant is in.
    pub fn next(&self) -> Option<pb::GetDrawRequest> {
        let offset = match &self.draw {
            None => 0,
            Some(draw) if (draw.entrants.len() as u32) < draw.entrant_count => {
                draw.entrants.len() as u32
            }
            Some(_) => return None,
        };
        Some(pb::GetDrawRequest {
            sku: self.sku.clone(),
            offset,
            limit: DRAW_PAGE,
        })
    }

    /// Adds the answer to [`Self::next`]'s request; ABORTED if the draw
    /// changed since the first page.
    pub fn add(&mut self, page: pb::GetDrawResponse) -> Result<(), Status> {
        let Some(draw) = &mut self.draw else {
            self.draw = Some(page);
            return Ok(());
        };
        if page.entrants.is_empty() || page.seed != draw.seed || page.drawn_at != draw.drawn_at {
            return Err(Status::aborted(
                "the draw changed while it was read; read again",
            ));
        }
        draw.entrants.extend(page.entrants);
        Ok(())
    }

    /// The draw with every entrant.
    pub fn into_draw(self) -> pb::GetDrawResponse {
        self.draw.unwrap_or_default()
    }
}

/// Entrants per GetDraw page (the most the server gives).
const DRAW_PAGE: u32 = 10_000;

pub async fn run(args: AdminArgs) -> anyhow::Result<String> {
    let mut admin = client(&args).await?;
    let status = |s: Status| {
        anyhow!(
            "{}: {}",
            stockgate::metrics::code_name(s.code() as i32),
            s.message()
        )
    };
    match args.command {
        AdminCommand::Layers { change: None } => {
            let answer = admin
                .get_layers(pb::GetLayersRequest {})
                .await
                .map_err(status)?
                .into_inner();
            Ok(render_layers(&answer))
        }
        AdminCommand::Layers {
            change:
                Some(LayersCommand::Set {
                    assignments,
                    force,
                    reason,
                }),
        } => {
            let current = admin
                .get_layers(pb::GetLayersRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .layers
                .unwrap_or_default();
            let request = parse_assignments(&assignments, &current, force, reason)?;
            let answer = admin
                .set_layers(request)
                .await
                .map_err(status)?
                .into_inner();
            let mut out = format!(
                "revision {} stored; this replica now runs:\n",
                answer.revision
            );
            out.push_str(&render_switches(&answer.layers.unwrap_or_default()));
            Ok(out)
        }
        AdminCommand::Stock { command } => {
            let view = match command {
                StockCommand::Get { sku } => {
                    admin
                        .get_stock(pb::GetStockRequest { sku })
                        .await
                        .map_err(status)?
                        .into_inner()
                        .stock
                }
                StockCommand::Set {
                    sku,
                    stock,
                    max_per_user,
                } => {
                    admin
                        .set_stock(pb::SetStockRequest {
                            sku,
                            stock,
                            max_per_user,
                        })
                        .await
                        .map_err(status)?
                        .into_inner()
                        .stock
                }
                StockCommand::Policy {
                    sku,
                    policy,
                    waitlist_limit,
                } => {
                    let policy = pb::SoldOutPolicy::from_str_name(&format!(
                        "SOLD_OUT_POLICY_{}",
                        policy.to_ascii_uppercase()
                    ))
                    .filter(|p| *p != pb::SoldOutPolicy::Unspecified)
                    .ok_or_else(|| anyhow!("policy {policy}: expected instant or waitlist"))?;
                    admin
                        .set_sold_out_policy(pb::SetSoldOutPolicyRequest {
                            sku,
                            policy: policy as i32,
                            waitlist_limit,
                        })
                        .await
                        .map_err(status)?
                        .into_inner()
                        .stock
                }
                StockCommand::Window {
                    sku,
                    opens_at,
                    closes_at,
                    draw_ms,
                    reason,
                } => {
                    let at = |flag: &str, text: Option<String>| {
                        text.map(|text| {
                            chrono::DateTime::parse_from_rfc3339(&text)
                                .map(|t| prost_types::Timestamp {
                                    seconds: t.timestamp(),
                                    nanos: t.timestamp_subsec_nanos() as i32,
                                })
                                .map_err(|e| anyhow!("{flag} {text}: not an RFC 3339 time: {e}"))
                        })
                        .transpose()
                    };
                    admin
                        .set_sale_window(pb::SetSaleWindowRequest {
                            sku,
                            opens_at: at("--opens-at", opens_at)?,
                            closes_at: at("--closes-at", closes_at)?,
                            draw_window_ms: draw_ms,
                            reason,
                        })
                        .await
                        .map_err(status)?
                        .into_inner()
                        .stock
                }
                StockCommand::Adjust { sku, delta } => {
                    admin
                        .adjust_stock(pb::AdjustStockRequest { sku, delta })
                        .await
                        .map_err(status)?
                        .into_inner()
                        .stock
                }
            };
            Ok(render_stock(&view.unwrap_or_default()))
        }
        AdminCommand::Sale { command } => {
            let sale = match command {
                SaleCommand::Show { sale_id } => {
                    admin
                        .get_sale(pb::GetSaleRequest { sale_id })
                        .await
                        .map_err(status)?
                        .into_inner()
                        .sale
                }
                SaleCommand::Set {
                    sale_id,
                    max_per_user,
                    skus,
                    reason,
                } => {
                    admin
                        .set_sale(pb::SetSaleRequest {
                            sale_id,
                            max_per_user,
                            skus: skus.into_iter().filter(|s| !s.is_empty()).collect(),
                            reason,
                        })
                        .await
                        .map_err(status)?
                        .into_inner()
                        .sale
                }
            };
            Ok(render_sale(&sale.unwrap_or_default()))
        }
        AdminCommand::Reservations {
            command: ReservationsCommand::List { sku, state, limit },
        } => {
            let state = match state.as_deref() {
                None => pb::ReservationState::Unspecified,
                Some(name) => pb::ReservationState::from_str_name(&format!(
                    "RESERVATION_STATE_{}",
                    name.to_ascii_uppercase()
                ))
                .ok_or_else(|| {
                    anyhow!(
                        "--state {name}: expected waitlisted, held, confirmed, released, expired or rejected"
                    )
                })?,
            };
            let answer = admin
                .list_reservations(pb::ListReservationsRequest {
                    sku: sku.unwrap_or_default(),
                    state: state as i32,
                    limit,
                })
                .await
                .map_err(status)?
                .into_inner();
            Ok(render_reservations(&answer.reservations))
        }
        AdminCommand::Draw { sku, entrants } => {
            let mut pages = DrawPages::new(&sku);
            while let Some(request) = pages.next() {
                let page = admin.get_draw(request).await.map_err(status)?;
                pages.add(page.into_inner()).map_err(status)?;
            }
            let draw = pages.into_draw();
            let max_per_user = admin
                .get_stock(pb::GetStockRequest { sku })
                .await
                .map_err(status)?
                .into_inner()
                .stock
                .map_or(0, |s| s.max_per_user);
            let (out, agrees) = render::render_draw(&draw, max_per_user, entrants);
            if agrees {
                Ok(out)
            } else {
                Err(anyhow!("{out}the re-run disagrees with the gate's draw"))
            }
        }
        AdminCommand::Check { sku } => {
            let answer = admin
                .check_invariants(pb::CheckInvariantsRequest {
                    sku: sku.unwrap_or_default(),
                })
                .await
                .map_err(status)?
                .into_inner();
            let out = render_check(&answer);
            if answer.ok {
                Ok(out)
            } else {
                Err(anyhow!("{out}invariants broken"))
            }
        }
        AdminCommand::Dlq { command } => match command {
            DlqCommand::List { limit } => {
                let answer = admin
                    .list_dead_letters(pb::ListDeadLettersRequest { limit })
                    .await
                    .map_err(status)?
                    .into_inner();
                Ok(render_dead_letters(&answer))
            }
            DlqCommand::Redrive {
                which,
                limit,
                reason,
            } => {
                let answer = admin
                    .redrive_dead_letters(pb::RedriveDeadLettersRequest {
                        selection: Some(selection(which, limit)),
                        reason,
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                Ok(render_moved("redrove", &answer.moved.unwrap_or_default()))
            }
            DlqCommand::Purge {
                which,
                limit,
                reason,
            } => {
                let answer = admin
                    .purge_dead_letters(pb::PurgeDeadLettersRequest {
                        selection: Some(selection(which, limit)),
                        reason,
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                Ok(render_moved("purged", &answer.moved.unwrap_or_default()))
            }
        },
        AdminCommand::Audit { limit } => {
            let answer = admin
                .list_audit_events(pb::ListAuditEventsRequest { limit })
                .await
                .map_err(status)?
                .into_inner();
            Ok(render_audit(&answer.events))
        }
    }
}

fn on_off(value: &str, key: &str) -> anyhow::Result<bool> {
    match value {
        "on" | "true" | "1" | "yes" => Ok(true),
        "off" | "false" | "0" | "no" => Ok(false),
        _ => bail!("{key}={value}: expected on or off"),
    }
}

fn number<T: std::str::FromStr>(value: &str, key: &str) -> anyhow::Result<T> {
    value
        .parse()
        .map_err(|_| anyhow!("{key}={value}: expected a positive whole number"))
}

/// `key=value` pairs into a SetLayers request; rate fields not given keep
/// the replica's current values (the request carries all four).
pub fn parse_assignments(
    assignments: &[String],
    current: &Layers,
    force: bool,
    reason: String,
) -> anyhow::Result<SetLayersRequest> {
    let mut request = SetLayersRequest {
        force,
        reason,
        ..Default::default()
    };
    let mut rates: Option<RateLimitSettings> = None;
    for assignment in assignments {
        let (key, value) = assignment
            .split_once('=')
            .ok_or_else(|| anyhow!("`{assignment}`: expected key=value"))?;
        let base = current.rate_limits.unwrap_or_default();
        match key {
            "rate_limit" => request.rate_limit = Some(on_off(value, key)?),
            "rate_limit.shadow" => request.rate_limit_shadow = Some(on_off(value, key)?),
            "rate_limit.per_user_period_ms" => rates.get_or_insert(base).per_user_period_ms = number(value, key)?,
            "rate_limit.per_user_burst" => rates.get_or_insert(base).per_user_burst = number(value, key)?,
            "rate_limit.global_per_sec" => rates.get_or_insert(base).global_per_sec = number(value, key)?,
            "rate_limit.global_burst" => rates.get_or_insert(base).global_burst = number(value, key)?,
            "dedup" => request.dedup = Some(on_off(value, key)?),
            "gate" => request.gate = Some(on_off(value, key)?),
            "gate.failure_mode" => {
                request.gate_failure_mode = match value {
                    "fail_closed" => GateFailureMode::FailClosed,
                    "bypass" => GateFailureMode::Bypass,
                    _ => bail!("{key}={value}: expected fail_closed or bypass"),
                } as i32
            }
            "queue" => request.queue = Some(on_off(value, key)?),
            "db_check" => {
                request.db_check = match value {
                    "optimistic" => DbCheckMode::Optimistic,
                    "pessimistic" => DbCheckMode::Pessimistic,
                    "off" => DbCheckMode::Off,
                    _ => bail!("{key}={value}: expected optimistic, pessimistic or off"),
                } as i32
            }
            _ => bail!(
                "unknown key `{key}`; keys: rate_limit, rate_limit.shadow, rate_limit.per_user_period_ms, rate_limit.per_user_burst, rate_limit.global_per_sec, rate_limit.global_burst, dedup, gate, gate.failure_mode, queue, db_check"
            ),
        }
    }
    request.rate_limits = rates;
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignments_become_one_request() {
        let current = Layers {
            rate_limits: Some(RateLimitSettings {
                per_user_period_ms: 1000,
                per_user_burst: 5,
                global_per_sec: 100,
                global_burst: 100,
            }),
            ..Default::default()
        };
        let request = parse_assignments(
            &[
                "gate=off".into(),
                "db_check=pessimistic".into(),
                "rate_limit.global_per_sec=7".into(),
                "gate.failure_mode=bypass".into(),
            ],
            &current,
            true,
            "drill".into(),
        )
        .unwrap();
        assert_eq!(request.gate, Some(false));
        assert_eq!(request.db_check, DbCheckMode::Pessimistic as i32);
        assert_eq!(request.gate_failure_mode, GateFailureMode::Bypass as i32);
        let rates = request.rate_limits.unwrap();
        assert_eq!((rates.global_per_sec, rates.per_user_burst), (7, 5));
        assert!(request.force);
        assert_eq!(request.dedup, None);
    }

    #[test]
    fn bad_assignments_name_the_key() {
        let current = Layers::default();
        for (bad, needle) in [
            ("gate", "key=value"),
            ("gate=maybe", "gate=maybe"),
            ("db_check=none", "db_check=none"),
            ("nope=on", "unknown key `nope`"),
            ("rate_limit.global_burst=-1", "rate_limit.global_burst"),
        ] {
            let err = parse_assignments(&[bad.into()], &current, false, String::new())
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }
}

//! `stockgate.v1.AdminService`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::{
    config::DbCheckMode,
    domain::{
        pipeline::{Layers, LayersChange, Pipeline, StockView},
        Sku,
    },
    error::ReservationError,
    middleware::{InFlight, RateLimits},
    pb::{self, admin_service_server::AdminService},
};

pub struct AdminApi {
    pipeline: Arc<Pipeline>,
    rate_limits: Arc<RateLimits>,
    in_flight: Option<Arc<InFlight>>,
}

impl AdminApi {
    pub fn new(
        pipeline: Arc<Pipeline>,
        rate_limits: Arc<RateLimits>,
        in_flight: Option<Arc<InFlight>>,
    ) -> Self {
        Self {
            pipeline,
            rate_limits,
            in_flight,
        }
    }
}

/// Largest stock one SKU may be set to; far above any sale, far below
/// overflow in every sum we take.
const MAX_STOCK: i64 = 1_000_000_000_000;

fn stock_view(view: StockView) -> pb::StockView {
    pb::StockView {
        sku: view.row.sku,
        db_stock: view.row.stock,
        db_version: view.row.version,
        gate_stock: view.gate_stock,
        held_units: view.held_units,
        confirmed_units: view.confirmed_units,
        queued_units: view.queued_units,
        max_per_user: u32::try_from(view.row.max_per_user).unwrap_or(0),
    }
}

fn db_check(mode: DbCheckMode) -> pb::DbCheckMode {
    match mode {
        DbCheckMode::Optimistic => pb::DbCheckMode::Optimistic,
        DbCheckMode::Pessimistic => pb::DbCheckMode::Pessimistic,
    }
}

fn layers(layers: Layers) -> pb::Layers {
    pb::Layers {
        rate_limit: layers.rate_limit,
        dedup: layers.dedup,
        gate: layers.gate,
        queue: layers.queue,
        db_check: db_check(layers.db_check) as i32,
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn set_stock(
        &self,
        request: Request<pb::SetStockRequest>,
    ) -> Result<Response<pb::SetStockResponse>, Status> {
        let body = request.into_inner();
        let sku = Sku::parse(&body.sku)?;
        if !(0..=MAX_STOCK).contains(&body.stock) {
            return Err(ReservationError::invalid(
                "stock",
                format!("must be between 0 and {MAX_STOCK}, got {}", body.stock),
            )
            .into());
        }
        if body.max_per_user > i32::MAX as u32 {
            return Err(ReservationError::invalid("max_per_user", "too large").into());
        }
        let view = self
            .pipeline
            .set_stock(&sku, body.stock, body.max_per_user)
            .await?;
        Ok(Response::new(pb::SetStockResponse {
            stock: Some(stock_view(view)),
        }))
    }

    async fn adjust_stock(
        &self,
        request: Request<pb::AdjustStockRequest>,
    ) -> Result<Response<pb::AdjustStockResponse>, Status> {
        let body = request.into_inner();
        let sku = Sku::parse(&body.sku)?;
        if body.delta == 0 || body.delta.abs() > MAX_STOCK {
            return Err(ReservationError::invalid(
                "delta",
                format!("must be non-zero and at most {MAX_STOCK} in size"),
            )
            .into());
        }
        let view = self.pipeline.adjust_stock(&sku, body.delta).await?;
        Ok(Response::new(pb::AdjustStockResponse {
            stock: Some(stock_view(view)),
        }))
    }

    async fn get_stock(
        &self,
        request: Request<pb::GetStockRequest>,
    ) -> Result<Response<pb::GetStockResponse>, Status> {
        let sku = Sku::parse(&request.get_ref().sku)?;
        let view = self.pipeline.stock(&sku).await?;
        Ok(Response::new(pb::GetStockResponse {
            stock: Some(stock_view(view)),
        }))
    }

    async fn get_layers(
        &self,
        _request: Request<pb::GetLayersRequest>,
    ) -> Result<Response<pb::GetLayersResponse>, Status> {
        let stats = self.rate_limits.stats();
        Ok(Response::new(pb::GetLayersResponse {
            layers: Some(layers(self.pipeline.layers())),
            rate_limit_stats: Some(pb::RateLimitStats {
                admitted: stats.admitted,
                refused: stats.refused,
                shadow_refused: stats.shadow_refused,
                tracked_users: stats.tracked_users,
            }),
            load_shed_stats: self.in_flight.as_ref().map(|limit| {
                let stats = limit.stats();
                pb::LoadShedStats {
                    max_in_flight: stats.max_in_flight,
                    in_flight: stats.in_flight,
                    peak_in_flight: stats.peak_in_flight,
                    shed: stats.shed,
                }
            }),
        }))
    }

    async fn set_layers(
        &self,
        request: Request<pb::SetLayersRequest>,
    ) -> Result<Response<pb::SetLayersResponse>, Status> {
        let body = request.into_inner();
        let db_check = match pb::DbCheckMode::try_from(body.db_check) {
            Ok(pb::DbCheckMode::Unspecified) => None,
            Ok(pb::DbCheckMode::Optimistic) => Some(DbCheckMode::Optimistic),
            Ok(pb::DbCheckMode::Pessimistic) => Some(DbCheckMode::Pessimistic),
            Err(_) => {
                return Err(ReservationError::invalid(
                    "db_check",
                    format!("unknown mode {}", body.db_check),
                )
                .into())
            }
        };
        let after = self
            .pipeline
            .set_layers(LayersChange {
                rate_limit: body.rate_limit,
                dedup: body.dedup,
                gate: body.gate,
                queue: body.queue,
                db_check,
            })
            .await?;
        Ok(Response::new(pb::SetLayersResponse {
            layers: Some(layers(after)),
        }))
    }
}

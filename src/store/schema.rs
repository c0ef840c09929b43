//! Table definitions shared by the PostgreSQL and SQLite migrations.

diesel::table! {
    inventory (sku) {
        sku -> Varchar,
        stock -> BigInt,
        version -> BigInt,
        max_per_user -> Integer,
        created_at -> Timestamp,
        updated_at -> Timestamp,
        supplied -> BigInt,
        sold_out_policy -> Varchar,
        waitlist_limit -> Integer,
        opens_at -> Nullable<Timestamp>,
        closes_at -> Nullable<Timestamp>,
        sale_id -> Nullable<Varchar>,
        draw_window_ms -> Integer,
    }
}

diesel::table! {
    sales (sale_id) {
        sale_id -> Varchar,
        max_per_user -> Integer,
        created_at -> Timestamp,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    reservations (reservation_id) {
        reservation_id -> Varchar,
        sku -> Varchar,
        user_id -> Varchar,
        idempotency_key -> Nullable<Varchar>,
        quantity -> Integer,
        state -> Varchar,
        reject_reason -> Nullable<Text>,
        expires_at -> Nullable<Timestamp>,
        created_at -> Timestamp,
        updated_at -> Timestamp,
        cart_id -> Nullable<Varchar>,
    }
}

diesel::joinable!(reservations -> inventory (sku));
diesel::joinable!(inventory -> sales (sale_id));
diesel::allow_tables_to_appear_in_same_query!(inventory, reservations, sales);

diesel::table! {
    layer_switches (id) {
        id -> Integer,
        revision -> BigInt,
        switches -> Text,
        changed_by -> Text,
        changed_at -> Timestamp,
    }
}

diesel::table! {
    audit_log (id) {
        id -> BigInt,
        at -> Timestamp,
        actor -> Text,
        action -> Text,
        outcome -> Text,
        before -> Text,
        after -> Text,
        reason -> Text,
    }
}

diesel::table! {
    replicas (replica) {
        replica -> Varchar,
        revision -> BigInt,
        switches -> Text,
        seen_at -> Timestamp,
    }
}

diesel::allow_columns_to_appear_in_same_group_by_clause!(inventory::sale_id, reservations::user_id);

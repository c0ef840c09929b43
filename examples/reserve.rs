//! Reserve, wait for the hold, confirm: what a checkout service does.
//!
//!   cargo run                                  # a server, in another shell
//!   cargo run --example reserve -- TSHIRT-RED-M 1
//!
//! The SKU must exist: `stockgate admin stock set TSHIRT-RED-M 10`.

use stockgate::{client::Client, pb::ReserveOutcome};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let sku = args.next().unwrap_or_else(|| "TSHIRT-RED-M".into());
    let quantity: u32 = args.next().map_or(Ok(1), |q| q.parse())?;
    let addr = std::env::var("STOCKGATE_ADDR").unwrap_or_else(|_| "http://127.0.0.1:50051".into());
    let user = format!("example-{}", std::process::id());

    let mut client = Client::connect(&addr, &user).await?;
    // One key per purchase attempt: a retry of this call reuses it.
    let key = format!("{user}-{sku}-1");
    let answer = client.reserve(&sku, quantity, &key).await?;
    match (answer.outcome(), answer.reservation) {
        (ReserveOutcome::Reserved | ReserveOutcome::Queued, Some(reservation)) => {
            let decided = client
                .wait_until_decided(&reservation.reservation_id)
                .await?;
            println!("{}: {:?}", decided.reservation_id, decided.state());
            let confirmed = client.confirm(&decided.reservation_id).await?;
            println!("{}: {:?}", confirmed.reservation_id, confirmed.state());
        }
        (outcome, _) => println!("{sku}: {outcome:?}"),
    }
    Ok(())
}

//! The fair opening's draw (see `docs/architecture.md`, "Fair opening"):
//! the order entrants are decided in, which the Redis script and the
//! embedded gate compute alike and an auditor can compute again from the
//! seed and the entrants' reservation ids alone.
//!
//! An entrant's key is the first 13 hex digits (52 bits, exact in a Lua
//! number) of SHA-1 of `seed:reservation_id`; entrants are decided in
//! ascending key order, ties (one in 2^52 per pair) by reservation id,
//! which is a Redis sorted set's own order for equal scores. SHA-1 is what
//! a Redis script can compute (`redis.sha1hex`); nothing here needs more
//! than a keyed shuffle a caller cannot steer, and callers cannot choose
//! reservation ids (the server makes them).

/// Most entrants one draw takes; later calls in its window wait for its
/// close and are then decided first come, first served. Bounds the memory
/// a draw holds and the work of the one script run that decides it.
pub const MAX_DRAW_ENTRANTS: u32 = 100_000;

/// How long the gate keeps a draw after its last change, so operators can
/// read it back (GetDraw). Redis expires it; the embedded gate keeps a
/// SKU's latest draw until the next opening's first entrant.
pub const DRAW_KEEP_SECS: u64 = 7 * 24 * 60 * 60;

/// Entrants one run of the Redis script decides at most: a draw of many
/// entrants is decided over several runs (whichever calls come after the
/// close), so no run holds Redis for long (about 13 µs an entrant).
pub const DRAW_CHUNK: u32 = 2_000;

/// What a draw decided for one entrant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrawOutcome {
    Admitted,
    SoldOut,
    UserLimit,
    /// Its reservation id already had a record when the draw came to it:
    /// skipped, nothing taken. Defensive: the server makes a fresh id per
    /// call and no path writes one for an undecided entrant.
    Withdrawn,
}

impl DrawOutcome {
    /// The code the Redis script stores.
    pub fn from_code(code: i64) -> Option<Self> {
        match code {
            1 => Some(Self::Admitted),
            2 => Some(Self::SoldOut),
            3 => Some(Self::UserLimit),
            4 => Some(Self::Withdrawn),
            _ => None,
        }
    }
}

/// One call entered in a draw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrawEntrant {
    pub id: String,
    pub user: String,
    pub quantity: u32,
    /// 1 for the first call entered.
    pub arrival: u32,
    /// Place in the draw's order, 1 decided first; 0 before the draw.
    pub drawn: u32,
    /// `None` before the draw.
    pub outcome: Option<DrawOutcome>,
}

/// A SKU's draw as the gate keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draw {
    pub opens_at_ms: i64,
    pub ends_at_ms: i64,
    /// 16 hex digits.
    pub seed: String,
    /// When it ran (Unix ms); `None` before.
    pub drawn_at_ms: Option<i64>,
    /// Units the draw could give out when it ran.
    pub stock_at_draw: i64,
    /// Every entrant, in arrival order.
    pub entrants: Vec<DrawEntrant>,
    /// Calls that came while the draw was full.
    pub overflow: u32,
}

/// A finished draw as the audit trail keeps it (its entrants stay with
/// the gate, see [`DRAW_KEEP_SECS`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DrawSummary {
    pub opens_at_ms: i64,
    pub ends_at_ms: i64,
    pub seed: String,
    pub drawn_at_ms: i64,
    pub stock_at_draw: i64,
    pub entrants: u32,
    pub admitted: u32,
    pub overflow: u32,
}

/// A fresh seed: 16 hex digits.
pub fn new_seed() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// An entrant's key (see the module docs).
pub fn draw_key(seed: &str, id: &str) -> u64 {
    let hex = sha1_smol::Sha1::from(format!("{seed}:{id}"))
        .digest()
        .to_string();
    u64::from_str_radix(&hex[..13], 16).expect("SHA-1 hex digits")
}

/// `ids` in the order the draw decides them.
pub fn draw_order<'a>(seed: &str, ids: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let mut keyed: Vec<(u64, &str)> = ids.into_iter().map(|id| (draw_key(seed, id), id)).collect();
    keyed.sort_unstable();
    keyed.into_iter().map(|(_, id)| id).collect()
}

/// Re-runs a draw from its record: `entrants` as GetDraw lists them,
/// decided in the draw's order from `stock` units, each user held to
/// `max_per_user` units (0: no limit) counted from none; an entrant
/// recorded as [`DrawOutcome::Withdrawn`] is skipped as the gate skipped
/// it. Returns each entrant's place and outcome, in the order given. It
/// matches the gate's own run when no entrant's user held units of the
/// SKU before the draw and, on the embedded gate, no sale's cap refused
/// anyone.
pub fn replay(
    seed: &str,
    stock: i64,
    max_per_user: u32,
    entrants: &[DrawEntrant],
) -> Vec<(u32, DrawOutcome)> {
    let order = draw_order(seed, entrants.iter().map(|e| e.id.as_str()));
    let index: std::collections::HashMap<&str, usize> = entrants
        .iter()
        .enumerate()
        .map(|(i, e)| (e.id.as_str(), i))
        .collect();
    let mut decided = vec![(0, DrawOutcome::SoldOut); entrants.len()];
    let mut live: std::collections::HashMap<&str, i64> = Default::default();
    let mut left = stock;
    for (place, id) in order.into_iter().enumerate() {
        let i = index[id];
        let entrant = &entrants[i];
        let units = i64::from(entrant.quantity);
        let held = live.get(entrant.user.as_str()).copied().unwrap_or(0);
        let outcome = if entrant.outcome == Some(DrawOutcome::Withdrawn) && left > 0 {
            DrawOutcome::Withdrawn
        } else if left <= 0 || left < units {
            DrawOutcome::SoldOut
        } else if max_per_user > 0 && held + units > i64::from(max_per_user) {
            DrawOutcome::UserLimit
        } else {
            left -= units;
            live.insert(entrant.user.as_str(), held + units);
            DrawOutcome::Admitted
        };
        decided[i] = (place as u32 + 1, outcome);
    }
    decided
}

/// The first of `entrants` (as GetDraw lists them, with the gate's places
/// and outcomes) whose place or outcome [`replay`] does not give, with
/// what the re-run gave; `None` when the record re-runs the same.
pub fn first_difference<'a>(
    seed: &str,
    stock: i64,
    max_per_user: u32,
    entrants: &'a [DrawEntrant],
) -> Option<(&'a DrawEntrant, (u32, DrawOutcome))> {
    let again = replay(seed, stock, max_per_user, entrants);
    entrants
        .iter()
        .zip(again)
        .find(|(e, (place, outcome))| (e.drawn, e.outcome) != (*place, Some(*outcome)))
}

/// How far the winners' arrival ranks (1 = first entrant) are from an
/// even spread over `1..=entrants`: the Kolmogorov-Smirnov statistic D
/// of their distribution against the uniform one. A random draw keeps
/// D under 1.95 / sqrt(winners) but once in a thousand; first come,
/// first served puts it near 1. `None` without winners.
pub fn rank_spread(arrivals: &[u32], entrants: u32) -> Option<f64> {
    if arrivals.is_empty() || entrants == 0 {
        return None;
    }
    let mut ranks: Vec<f64> = arrivals.iter().map(|&r| f64::from(r)).collect();
    ranks.sort_by(f64::total_cmp);
    let n = ranks.len() as f64;
    Some(
        ranks
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let cdf = r / f64::from(entrants);
                let (below, upto) = (i as f64 / n, (i + 1) as f64 / n);
                (cdf - below).abs().max((upto - cdf).abs())
            })
            .fold(0.0, f64::max),
    )
}

/// The value of [`rank_spread`] a random draw of `winners` stays under
/// with 99.9% probability (the Kolmogorov-Smirnov critical value).
pub fn rank_spread_bound(winners: usize) -> f64 {
    1.95 / (winners.max(1) as f64).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key Redis computes for the same entrant: `redis-cli EVAL
    /// "return tostring(tonumber(string.sub(redis.sha1hex(ARGV[1]), 1, 13), 16))"
    /// 0 0123456789abcdef:r-1` printed 25824914305267 on this machine's
    /// Redis 7.0.15 (SHA-1 0177cd4d7f0f3…, as `sha1sum` says).
    #[test]
    fn keys_are_the_first_52_bits_of_sha1_as_redis_computes_them() {
        assert_eq!(draw_key("0123456789abcdef", "r-1"), 25_824_914_305_267);
    }

    #[test]
    fn the_same_seed_gives_the_same_order_and_another_seed_another() {
        let ids: Vec<String> = (0..1_000).map(|i| format!("r-{i}")).collect();
        let order = |seed: &str| -> Vec<String> {
            draw_order(seed, ids.iter().map(String::as_str))
                .into_iter()
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(order("00000000000000aa"), order("00000000000000aa"));
        assert_ne!(order("00000000000000aa"), order("00000000000000ab"));
        let mut sorted = order("00000000000000aa");
        sorted.sort();
        let mut all = ids.clone();
        all.sort();
        assert_eq!(sorted, all, "a permutation: every entrant once");
    }

    /// The winners' arrival ranks look like a random draw's: of N = 10,000
    /// entrants in arrival order, the first S = 100 in draw order are
    /// compared with the uniform distribution over 1..=N by the
    /// Kolmogorov-Smirnov statistic. Its critical value at a 0.1% false
    /// failure rate is 1.95 / sqrt(S) = 0.195 (a random seed fails this
    /// once in a thousand; the seed here is fixed, so the test either
    /// always passes or always fails). Arrival order itself (first come,
    /// first served) scores D = 0.99 and fails it, as does any draw that
    /// favours early callers.
    #[test]
    fn winners_arrival_ranks_spread_as_a_random_draw() {
        const N: usize = 10_000;
        const S: usize = 100;
        let ids: Vec<String> = (0..N)
            .map(|i| {
                uuid::Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0000 + i as u128)
                    .to_string()
            })
            .collect();
        let rank: std::collections::HashMap<&str, u32> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.as_str(), i as u32 + 1))
            .collect();
        let arrivals =
            |winners: &[&str]| -> Vec<u32> { winners.iter().map(|id| rank[id]).collect() };
        let bound = rank_spread_bound(S);
        assert!((bound - 0.195).abs() < 1e-9);
        let order = draw_order("5eed5eed5eed5eed", ids.iter().map(String::as_str));
        let d = rank_spread(&arrivals(&order[..S]), N as u32).unwrap();
        assert!(d < bound, "D = {d}");
        let first_come: Vec<&str> = ids[..S].iter().map(String::as_str).collect();
        let d = rank_spread(&arrivals(&first_come), N as u32).unwrap();
        assert!(d > 0.98, "the test tells arrival order: D = {d}");
    }
}

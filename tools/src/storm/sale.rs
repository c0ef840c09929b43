//! What is on sale in one storm: the SKUs, and which of them each call asks
//! for. Real sales are skewed: a few SKUs draw most buyers and a long tail
//! draws a few each, which a Zipf law describes (rank `k` drawn in
//! proportion to `1 / k^s`; `s` = 0 spreads calls evenly).

use futures::StreamExt;

use super::StormOptions;

pub(super) struct Sale {
    /// SKU names, most popular first.
    pub names: Vec<String>,
    /// For call `i` (its idempotency key), the index of its SKU in `names`:
    /// both halves of a double click and every retry ask for the same one.
    pub of_call: Vec<usize>,
}

impl Sale {
    pub fn new(options: &StormOptions, seed: u64) -> anyhow::Result<Self> {
        if options.skus == 0 {
            anyhow::bail!("--skus must be above 0");
        }
        if !(options.zipf >= 0.0 && options.zipf.is_finite()) {
            anyhow::bail!("--zipf is an exponent of 0 or more");
        }
        let names = if options.skus == 1 {
            vec![options.sku.clone()]
        } else {
            (0..options.skus)
                .map(|k| format!("{}-{k:04}", options.sku))
                .collect()
        };
        let mut cumulative = Vec::with_capacity(options.skus);
        let mut total = 0.0;
        for rank in 1..=options.skus {
            total += (rank as f64).powf(-options.zipf);
            cumulative.push(total);
        }
        let of_call = (0..options.requests)
            .map(|i| {
                let draw = unit_interval(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                cumulative
                    .partition_point(|c| *c <= draw * total)
                    .min(options.skus - 1)
            })
            .collect();
        Ok(Self { names, of_call })
    }

    pub fn sku_of(&self, call: usize) -> &str {
        &self.names[self.of_call[call]]
    }

    /// `call` for every SKU, 16 at once, the answers in SKU order; the
    /// first error ends it.
    pub async fn each_sku<'a, T, F, Fut>(&'a self, call: F) -> anyhow::Result<Vec<T>>
    where
        F: FnMut(&'a String) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<T>>,
    {
        futures::stream::iter(&self.names)
            .map(call)
            .buffered(16)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect()
    }
}

/// A number in [0, 1) from `x` (splitmix64's finaliser: calls' draws are
/// independent of their order, and `--seed` repeats a run's draws).
fn unit_interval(x: u64) -> f64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(skus: usize, zipf: f64, requests: usize) -> StormOptions {
        StormOptions {
            sku: "S".into(),
            skus,
            zipf,
            requests,
            ..StormOptions::default()
        }
    }

    #[test]
    fn one_sku_keeps_its_name_and_takes_every_call() {
        let sale = Sale::new(&options(1, 1.0, 100), 7).unwrap();
        assert_eq!(sale.names, vec!["S".to_owned()]);
        assert!(sale.of_call.iter().all(|k| *k == 0));
    }

    #[test]
    fn zipf_draws_follow_the_law_and_zero_is_even() {
        let calls = 200_000;
        let sale = Sale::new(&options(1_000, 1.0, calls), 42).unwrap();
        let mut counts = vec![0usize; 1_000];
        for k in &sale.of_call {
            counts[*k] += 1;
        }
        // Harmonic number H(1000) = 7.485: rank 1 draws 1/H of the calls,
        // rank 2 half of that, rank 10 a tenth.
        let share = |k: usize| counts[k] as f64 / calls as f64;
        assert!((share(0) - 0.1336).abs() < 0.005, "{}", share(0));
        assert!((share(1) - 0.0668).abs() < 0.004, "{}", share(1));
        assert!((share(9) - 0.01336).abs() < 0.002, "{}", share(9));
        assert_eq!(sale.names[3], "S-0003");

        let even = Sale::new(&options(10, 0.0, calls), 42).unwrap();
        let mut counts = vec![0usize; 10];
        for k in &even.of_call {
            counts[*k] += 1;
        }
        assert!(
            counts.iter().all(|n| (*n as f64 - 20_000.0).abs() < 800.0),
            "{counts:?}"
        );
        // Reproducible from the seed, different for another.
        assert_eq!(
            Sale::new(&options(1_000, 1.0, 50), 42).unwrap().of_call,
            sale.of_call[..50]
        );
        assert_ne!(
            Sale::new(&options(1_000, 1.0, 50), 43).unwrap().of_call,
            sale.of_call[..50]
        );
    }

    #[test]
    fn bad_shapes_are_refused() {
        assert!(Sale::new(&options(0, 1.0, 1), 1).is_err());
        assert!(Sale::new(&options(2, -1.0, 1), 1).is_err());
        assert!(Sale::new(&options(2, f64::NAN, 1), 1).is_err());
    }
}

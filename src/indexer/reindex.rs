//! Blue/green reindex (`unilog reindex`): a new index built by replaying
//! the topic, then an atomic alias swap.
//!
//! ```text
//!  1. create <alias>_v(N+1) with the current mapping      alias ──▶ <alias>_vN (live, searched)
//!  2. replay the topic from offset 0 into it, with progress
//!  3. caught up: every partition at its high watermark and the last read
//!     came back short of a full batch
//!  4. refresh, then one _aliases request: remove vN, add v(N+1)   alias ──▶ <alias>_v(N+1)
//!  5. keep reading for `settle` (writes the live indexer had in flight to vN)
//!  6. drop vN, or keep it (--keep-old)
//! ```
//!
//! Searches never see an empty or half-built index: the alias moves only
//! at step 4, in one request. Live changes are not lost: the live indexer
//! goes on writing through the alias (to vN before the swap, to v(N+1)
//! after), and the replay reads every record up to the swap and for a while
//! after it. Both write with the record offset as an `external_gte` version,
//! so whichever of the two writes a change last, the index holds the newest
//! version of each document.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};

use super::config::{IndexSpec, LoadedIndexerConfig};
use super::{kafka, next_batch, IndexError, IndexStats, Indexer};
use crate::topics::consumer_config;

/// How to run a reindex.
#[derive(Debug, Clone)]
pub struct ReindexOptions {
    /// The alias to rebuild (one of the config's `indexes`).
    pub alias: String,
    /// Keep the previous index after the swap (for a quick way back).
    pub keep_old: bool,
    /// How long to keep replaying into the new index after the swap.
    pub settle: Duration,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

/// What a reindex did.
#[derive(Debug, Clone)]
pub struct ReindexReport {
    pub index: String,
    pub previous: Vec<String>,
    pub dropped_previous: bool,
    pub records: u64,
    pub stats: IndexStats,
}

/// The version number in `<alias>_v<N>`.
fn version_of(alias: &str, index: &str) -> Option<u64> {
    index.strip_prefix(alias)?.strip_prefix("_v")?.parse().ok()
}

/// Rebuilds `opts.alias` by replay and swaps the alias.
#[allow(clippy::too_many_lines)]
pub async fn reindex(
    cfg: Arc<LoadedIndexerConfig>,
    opts: &ReindexOptions,
) -> Result<ReindexReport, IndexError> {
    let spec: IndexSpec = cfg.index(&opts.alias).cloned().ok_or_else(|| {
        IndexError::Usage(format!(
            "`{}` is not in {}; its aliases are: {}",
            opts.alias,
            cfg.path.display(),
            cfg.config
                .indexes
                .iter()
                .map(|i| i.alias.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
    let c = &cfg.config;
    super::check_kafka(c).await?;
    let mut ix = Indexer::new(cfg.clone())?;
    let search = ix.search().clone();
    let previous = search.alias_targets(&spec.alias).await?;
    if previous.is_empty() && search.exists(&spec.alias).await? {
        return Err(IndexError::Usage(format!(
            "`{}` is an index, not an alias; delete it or choose another alias name",
            spec.alias
        )));
    }
    // 1. The new index, with the mapping of the topic's current schema.
    let schema = ix.latest_schema(&spec.topic).await?;
    let body = super::mapping::index_body(&spec, schema.as_ref());
    let mut n = previous
        .iter()
        .filter_map(|i| version_of(&spec.alias, i))
        .max()
        .unwrap_or(0)
        + 1;
    let index = loop {
        let name = format!("{}_v{n}", spec.alias);
        if search.create_index(&name, &body).await? {
            break name;
        }
        // Left over from an interrupted reindex: never reuse it.
        n += 1;
    };
    tracing::info!(alias = %spec.alias, index = %index, previous = ?previous, "reindex: created the new index; replaying the topic");

    // 2. Replay from the beginning, outside the live indexer's group.
    let group = format!("unilog-reindex-{}-{}", c.name, std::process::id());
    let consumer: StreamConsumer = consumer_config(&c.kafka.brokers, &group, &c.kafka.properties)
        .create()
        .map_err(kafka("cannot create the consumer"))?;
    let md = consumer
        .fetch_metadata(Some(&spec.topic), Duration::from_secs(10))
        .map_err(kafka(format!(
            "cannot read the metadata of topic {}",
            spec.topic
        )))?;
    let partitions: Vec<i32> = md
        .topics()
        .first()
        .map(|t| {
            t.partitions()
                .iter()
                .map(rdkafka::metadata::MetadataPartition::id)
                .collect()
        })
        .unwrap_or_default();
    if partitions.is_empty() {
        return Err(IndexError::Usage(format!(
            "topic {} does not exist or has no partitions",
            spec.topic
        )));
    }
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition_offset(&spec.topic, *p, Offset::Beginning)
            .map_err(kafka("cannot assign partitions"))?;
    }
    consumer
        .assign(&tpl)
        .map_err(kafka(format!("cannot assign topic {}", spec.topic)))?;
    let watermarks = |consumer: &StreamConsumer| -> Result<HashMap<i32, i64>, IndexError> {
        partitions
            .iter()
            .map(|p| {
                consumer
                    .fetch_watermarks(&spec.topic, *p, Duration::from_secs(10))
                    .map(|(_, high)| (*p, high))
                    .map_err(kafka(format!(
                        "cannot read the high watermark of {} partition {p}",
                        spec.topic
                    )))
            })
            .collect()
    };
    let start_marks = watermarks(&consumer)?;
    let total: u64 = start_marks
        .values()
        .map(|h| u64::try_from(*h).unwrap_or(0))
        .sum();
    let bar = if opts.progress {
        indicatif::ProgressBar::new(total)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} records ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(format!("reindex {} -> {index}", spec.alias));

    let target_name = index.clone();
    let target = move |_: &IndexSpec| target_name.clone();
    let mut positions: HashMap<i32, i64> = partitions.iter().map(|p| (*p, 0)).collect();
    let mut stats = IndexStats::default();
    let mut records = 0u64;
    let mut last_log = Instant::now();
    let max = c.batch.max_docs;
    let wait = Duration::from_millis(c.batch.max_wait_ms.max(100));

    let step = |batch: Vec<super::Rec>, positions: &mut HashMap<i32, i64>| {
        for r in &batch {
            let e = positions.entry(r.partition).or_insert(0);
            *e = (*e).max(r.offset + 1);
        }
        batch
    };
    // 3. Until caught up.
    loop {
        let batch = next_batch(&consumer, max, wait).await?;
        let short = batch.len() < max;
        let batch = step(batch, &mut positions);
        if !batch.is_empty() {
            records += batch.len() as u64;
            let mut prepared = Vec::with_capacity(batch.len());
            for rec in batch {
                let a = ix.prepare_retrying(&rec).await?;
                prepared.push((rec, a));
            }
            stats.add(ix.write(&prepared, &target).await?);
            bar.inc(prepared.len() as u64);
        }
        if last_log.elapsed() > Duration::from_secs(5) {
            last_log = Instant::now();
            tracing::info!(alias = %spec.alias, index = %index, records, of_about = total, "reindex: replaying");
        }
        if short {
            let marks = watermarks(&consumer)?;
            if marks
                .iter()
                .all(|(p, high)| positions.get(p).copied().unwrap_or(0) >= *high)
            {
                break;
            }
        }
    }
    bar.finish_and_clear();
    // 4. The swap.
    search.refresh(&index).await?;
    search.swap_alias(&spec.alias, &previous, &index).await?;
    tracing::info!(alias = %spec.alias, index = %index, records, "reindex: caught up; alias swapped");
    // 5. Settle: what the live indexer had in flight to the old index.
    let until = Instant::now() + opts.settle;
    while Instant::now() < until {
        let batch = next_batch(&consumer, max, wait).await?;
        let batch = step(batch, &mut positions);
        if batch.is_empty() {
            continue;
        }
        records += batch.len() as u64;
        let mut prepared = Vec::with_capacity(batch.len());
        for rec in batch {
            let a = ix.prepare_retrying(&rec).await?;
            prepared.push((rec, a));
        }
        stats.add(ix.write(&prepared, &target).await?);
    }
    search.refresh(&index).await?;
    // 6. The old index.
    let drop_old = !opts.keep_old && !previous.is_empty();
    if drop_old {
        for old in &previous {
            search.delete_index(old).await?;
            tracing::info!(index = %old, "reindex: dropped the previous index");
        }
    }
    Ok(ReindexReport {
        index,
        previous,
        dropped_previous: drop_old,
        records,
        stats,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn versions_of_index_names() {
        assert_eq!(super::version_of("users", "users_v12"), Some(12));
        assert_eq!(super::version_of("users", "users_x"), None);
        assert_eq!(super::version_of("users", "users_v"), None);
    }
}

//! Event histories from CSV: a generic `user_id,product_id,timestamp[,type]` file (any data
//! set), or MovieLens `ratings.csv` (ratings at or above a threshold become events).

use std::collections::HashMap;
use std::path::Path;

use recpipe_shared::events::EventType;
use sha2::{Digest, Sha256};

use crate::TrainerError;

/// One past action.
#[derive(Debug, Clone, PartialEq)]
pub struct Interaction {
    pub user: String,
    pub product: String,
    /// Event time in ms since the epoch.
    pub ts: i64,
    pub event_type: EventType,
}

/// What a loaded history holds, plus a checksum of the file it came from.
#[derive(Debug, Clone)]
pub struct History {
    pub interactions: Vec<Interaction>,
    pub sha256: String,
    /// Titles and categories when the data set has them (MovieLens `movies.csv`).
    pub titles: HashMap<String, (String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Format {
    /// Header with `user_id`, `product_id`, `timestamp` and optionally `type`.
    Generic,
    /// MovieLens `ratings.csv`; ratings `>= min_rating` are kept as events.
    MovieLens { min_rating: f32 },
}

/// Timestamps below this are taken as seconds, above as milliseconds.
const SECONDS_BELOW: i64 = 100_000_000_000;

fn to_ms(ts: i64) -> i64 {
    if ts.abs() < SECONDS_BELOW {
        ts * 1000
    } else {
        ts
    }
}

pub fn load(path: &Path, format: Format) -> Result<History, TrainerError> {
    let bad = |message: String| TrainerError::Input {
        path: path.display().to_string(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let sha256 = format!("{:x}", Sha256::digest(&bytes));
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(bytes.as_slice());
    let headers = reader.headers().map_err(|e| bad(e.to_string()))?.clone();
    let column = |names: &[&str]| headers.iter().position(|h| names.contains(&h));
    let (user_col, product_col, ts_col, type_col, rating_col) = match format {
        Format::Generic => (
            column(&["user_id"]),
            column(&["product_id", "item_id"]),
            column(&["timestamp", "ts"]),
            column(&["type"]),
            None,
        ),
        Format::MovieLens { .. } => (
            column(&["userId"]),
            column(&["movieId"]),
            column(&["timestamp"]),
            None,
            column(&["rating"]),
        ),
    };
    let (Some(user_col), Some(product_col), Some(ts_col)) = (user_col, product_col, ts_col) else {
        let expected = match format {
            Format::Generic => "user_id,product_id,timestamp[,type]",
            Format::MovieLens { .. } => "userId,movieId,rating,timestamp",
        };
        return Err(bad(format!(
            "the header must name the columns {expected}; found {:?}",
            headers.iter().collect::<Vec<_>>()
        )));
    };
    let mut interactions = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let line = i + 2;
        let record = record.map_err(|e| bad(format!("line {line}: {e}")))?;
        let field = |c: usize| record.get(c).unwrap_or_default();
        let ts: i64 = field(ts_col).parse().map_err(|_| {
            bad(format!(
                "line {line}: timestamp {:?} is not an integer",
                field(ts_col)
            ))
        })?;
        let event_type = match (format, type_col) {
            (Format::MovieLens { min_rating }, _) => {
                let rating: f32 = field(rating_col.unwrap_or(0)).parse().map_err(|_| {
                    bad(format!(
                        "line {line}: rating {:?} is not a number",
                        field(rating_col.unwrap_or(0))
                    ))
                })?;
                if rating < min_rating {
                    continue;
                }
                EventType::View
            }
            (Format::Generic, Some(c)) => {
                serde_json::from_value(serde_json::Value::String(field(c).to_string()))
                    .map_err(|_| bad(format!("line {line}: unknown event type {:?}", field(c))))?
            }
            (Format::Generic, None) => EventType::View,
        };
        if event_type == EventType::Search {
            continue; // no product to learn from
        }
        let (user, product) = (field(user_col), field(product_col));
        if user.is_empty() || product.is_empty() {
            return Err(bad(format!("line {line}: empty user or product id")));
        }
        interactions.push(Interaction {
            user: user.to_string(),
            product: product.to_string(),
            ts: to_ms(ts),
            event_type,
        });
    }
    if interactions.is_empty() {
        return Err(TrainerError::Empty(format!(
            "{} has no usable rows",
            path.display()
        )));
    }
    let mut titles = HashMap::new();
    if let (Format::MovieLens { .. }, Some(dir)) = (format, path.parent()) {
        let movies = dir.join("movies.csv");
        if movies.exists() {
            let mut reader = csv::Reader::from_path(&movies).map_err(|e| bad(e.to_string()))?;
            for record in reader.records().flatten() {
                let genre = record
                    .get(2)
                    .unwrap_or_default()
                    .split('|')
                    .next()
                    .unwrap_or_default();
                titles.insert(
                    record.get(0).unwrap_or_default().to_string(),
                    (
                        record.get(1).unwrap_or_default().to_string(),
                        genre.to_lowercase(),
                    ),
                );
            }
        }
    }
    Ok(History {
        interactions,
        sha256,
        titles,
    })
}

/// Splits by event time: the first `share` of the events in time order train, the rest
/// are replayed (the protocol of the MovieLens reference figures). Returns both halves,
/// sorted by time (stable, so file order breaks ties), and the first replayed time.
pub fn split_by_time(
    mut interactions: Vec<Interaction>,
    share: f64,
) -> (Vec<Interaction>, Vec<Interaction>, i64) {
    interactions.sort_by_key(|i| i.ts);
    let at = ((interactions.len() as f64 * share.clamp(0.0, 1.0)) as usize).min(interactions.len());
    let test = interactions.split_off(at);
    let cut = test.first().map_or(i64::MAX, |i| i.ts);
    (interactions, test, cut)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generic_csv_with_types_and_seconds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.csv");
        std::fs::write(&path, "user_id,product_id,timestamp,type\nu1,p1,1700000000,view\nu1,p2,1700000001000,purchase\n").unwrap();
        let h = load(&path, Format::Generic).unwrap();
        assert_eq!(h.interactions.len(), 2);
        assert_eq!(h.interactions[0].ts, 1_700_000_000_000);
        assert_eq!(h.interactions[1].ts, 1_700_000_001_000);
        assert_eq!(h.interactions[1].event_type, EventType::Purchase);
        assert_eq!(h.sha256.len(), 64);
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.csv");
        std::fs::write(&path, "who,what,when\n1,2,3\n").unwrap();
        let err = load(&path, Format::Generic).unwrap_err().to_string();
        assert!(err.contains("user_id,product_id,timestamp"), "{err}");
        std::fs::write(&path, "user_id,product_id,timestamp\nu,p,soon\n").unwrap();
        let err = load(&path, Format::Generic).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("soon"), "{err}");
        std::fs::write(&path, "user_id,product_id,timestamp,type\nu,p,1,teleport\n").unwrap();
        assert!(load(&path, Format::Generic)
            .unwrap_err()
            .to_string()
            .contains("teleport"));
    }

    #[test]
    fn movielens_keeps_good_ratings_only_and_split_is_by_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ratings.csv");
        std::fs::write(&path, "userId,movieId,rating,timestamp\r\n1,10,4.0,100\r\n1,11,2.0,200\r\n2,10,3.5,300\r\n2,12,5.0,1000\r\n").unwrap();
        let h = load(&path, Format::MovieLens { min_rating: 3.5 }).unwrap();
        assert_eq!(h.interactions.len(), 3);
        let (train, test, cut) = split_by_time(h.interactions, 0.7);
        assert_eq!(train.len(), 2);
        assert_eq!(test.len(), 1);
        assert_eq!(test[0].product, "12");
        assert_eq!(cut, 1_000_000);
    }
}

//! Pages of rows for the console: filters, a text search, and keyset pagination that stays
//! as fast on the thousandth page of a million rows as on the first.

use super::admin::RowSummary;
use super::{QueueName, Store, StoreError};

/// What a page of rows is filtered by (each `None` = any).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RowFilter {
    /// Only rows with this status.
    pub status: Option<String>,
    /// Only this seller's rows (rebill: `tax_num`; title: the `sqm`).
    pub seller: Option<String>,
    /// Only rows whose order number or serial (title `ttqqlsh`) contains this text.
    pub text: Option<String>,
}

/// Where a row sorts among the rows of one status: `finished_at` descending puts text and
/// BLOB values (written around the daemon) first, then numbers, then NULL (active rows).
/// Each part is walked on its own, so no row is skipped or shown twice whatever the column
/// holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Part {
    /// `finished_at` holds text or a BLOB: by id.
    Odd,
    /// `finished_at` holds a number: by it, then id.
    Number,
    /// `finished_at` is NULL: by id.
    Null,
}

/// Where the next page starts: after the last row of the page before.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PageCursor {
    /// Which part of a status's rows that row was in (pages without a status filter walk
    /// ids only and ignore it).
    pub part: Part,
    /// That row's `finished_at`, when a number.
    pub finished_at: Option<f64>,
    /// That row's id.
    pub id: i64,
}

impl PageCursor {
    /// The cursor after `row`.
    fn after(row: &RowSummary) -> PageCursor {
        let part = match row.finished_type.as_str() {
            "null" => Part::Null,
            "integer" | "real" => Part::Number,
            _ => Part::Odd,
        };
        PageCursor {
            part,
            finished_at: row.finished_num,
            id: row.id,
        }
    }
}

/// One page of rows and where the next one starts (none after the last page).
#[derive(Debug, Clone)]
pub struct RowPage {
    /// The rows, newest first.
    pub rows: Vec<RowSummary>,
    /// The cursor of the next page.
    pub next: Option<PageCursor>,
}

/// `%`, `_` and `\` stand for themselves in the search text.
pub(crate) fn like_pattern(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('%');
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('%');
    out
}

/// A backend's reading of one [`Part`] of a page (or, with no part, of every status by
/// id); [`rows_page`] walks the parts.
pub trait PageSource {
    /// Up to `want` rows of `part` (`None`: no status filter, by id) after `from`.
    fn page_part(
        &self,
        queue: QueueName,
        filter: &RowFilter,
        part: Option<Part>,
        from: Option<PageCursor>,
        want: usize,
    ) -> impl std::future::Future<Output = Result<Vec<RowSummary>, StoreError>> + Send;
}

/// A page of `queue`'s rows matching `filter`, newest first, at most `limit`, after
/// `after`. Without a status filter "newest" is by id (the primary key walks it); within
/// one status it is by `finished_at`, then id, in the [`Part`]s of the status index: no
/// page sorts more than the odd rows or skips any.
pub async fn rows_page(
    store: &impl PageSource,
    queue: QueueName,
    filter: &RowFilter,
    after: Option<PageCursor>,
    limit: u32,
) -> Result<RowPage, StoreError> {
    let want = limit as usize + 1;
    let mut rows: Vec<RowSummary> = Vec::with_capacity(want);
    if filter.status.is_none() {
        rows = store.page_part(queue, filter, None, after, want).await?;
    } else {
        let first = after.map_or(Part::Odd, |c| c.part);
        for part in [Part::Odd, Part::Number, Part::Null] {
            if part < first || rows.len() >= want {
                continue;
            }
            let from = after.filter(|c| c.part == part);
            let more = store
                .page_part(queue, filter, Some(part), from, want - rows.len())
                .await?;
            rows.extend(more);
        }
    }
    let next = if rows.len() > limit as usize {
        rows.truncate(limit as usize);
        rows.last().map(PageCursor::after)
    } else {
        None
    };
    Ok(RowPage { rows, next })
}

impl PageSource for Store {
    async fn page_part(
        &self,
        queue: QueueName,
        filter: &RowFilter,
        part: Option<Part>,
        from: Option<PageCursor>,
        want: usize,
    ) -> Result<Vec<RowSummary>, StoreError> {
        let sql = self.page_sql(queue, filter, part, from);
        Ok(sqlx::query_as(&sql)
            .bind(filter.status.as_deref())
            .bind(from.and_then(|c| c.finished_at))
            .bind(from.map(|c| c.id))
            .bind(filter.seller.as_deref())
            .bind(filter.text.as_deref().map(like_pattern))
            .bind(want as i64)
            .fetch_all(self.pool())
            .await?)
    }
}

impl Store {
    /// The statement of one page part: `?1` status, `?2`/`?3` the cursor's finished_at
    /// and id, `?4` seller, `?5` LIKE pattern, `?6` limit.
    fn page_sql(
        &self,
        queue: QueueName,
        filter: &RowFilter,
        part: Option<Part>,
        from: Option<PageCursor>,
    ) -> String {
        let t = queue.table();
        let mut sql = self.sql(queue).list_select.clone();
        let mut conditions: Vec<String> = Vec::new();
        let by_id = format!("ORDER BY {t}.id DESC");
        let order = match part {
            None => {
                if from.is_some() {
                    conditions.push("id < ?3".into());
                }
                by_id
            }
            Some(part) => {
                sql = sql.replacen(
                    &format!("FROM {t}"),
                    &format!("FROM {t} INDEXED BY {t}_status"),
                    1,
                );
                conditions.push("status = ?1".into());
                // Text and BLOB sort after every number, NULL before: `''` splits them.
                match part {
                    Part::Odd => conditions.push("finished_at >= ''".into()),
                    Part::Number => conditions.push("finished_at < ''".into()),
                    Part::Null => conditions.push("finished_at IS NULL".into()),
                }
                if from.is_some() {
                    conditions.push(match part {
                        Part::Number => "(finished_at, id) < (?2, ?3)".into(),
                        Part::Odd | Part::Null => "id < ?3".into(),
                    });
                }
                // Qualified: unqualified, ORDER BY would mean the listing's `finished_at`
                // column (an expression), and sort.
                match part {
                    Part::Number => format!("ORDER BY {t}.finished_at DESC, {t}.id DESC"),
                    Part::Odd | Part::Null => by_id,
                }
            }
        };
        if filter.seller.is_some() {
            conditions.push(format!("{} = ?4", queue.seller_expr()));
        }
        if filter.text.is_some() {
            let serial = match queue {
                QueueName::Rebill => "NULL",
                QueueName::Title => "ttqqlsh",
            };
            conditions.push(format!(
                "({order} LIKE ?5 ESCAPE '\\' OR {serial} LIKE ?5 ESCAPE '\\')",
                order = queue.order_column()
            ));
        }
        sql.push_str(" WHERE ");
        if conditions.is_empty() {
            sql.push_str("TRUE");
        } else {
            sql.push_str(&conditions.join(" AND "));
        }
        sql.push_str(&format!(" {order} LIMIT ?6"));
        sql
    }

    /// Makes every `failed` row of one seller pending again with a fresh attempt budget
    /// (`retry --all-failed --seller`); returns how many.
    pub async fn retry_failed_of_seller(
        &self,
        queue: QueueName,
        seller: &str,
    ) -> Result<u64, StoreError> {
        let _turn = self.write_turn().await;
        let done = sqlx::query(&self.sql(queue).retry_failed_of_seller)
            .bind(super::now_ms())
            .bind(seller)
            .execute(self.pool())
            .await
            .map_err(StoreError::classify)?;
        Ok(done.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::temp_store;

    /// Rows 1..=n: every third failed (finished at 1000 + id), the rest pending; sellers
    /// A and B alternate.
    async fn rows(store: &Store, n: i64) {
        for id in 1..=n {
            let (status, finished) = if id % 3 == 0 {
                ("failed", Some(1000 + id))
            } else {
                ("pending", None)
            };
            sqlx::query(
                "INSERT INTO rebill_orders (id, orderno, tax_num, status, finished_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .bind(id)
            .bind(format!("ORD_{id:03}%"))
            .bind(if id % 2 == 0 { "A" } else { "B" })
            .bind(status)
            .bind(finished)
            .execute(store.pool())
            .await
            .expect("insert");
        }
    }

    async fn all_pages(store: &Store, filter: &RowFilter, limit: u32) -> Vec<i64> {
        let mut ids = Vec::new();
        let mut after = None;
        loop {
            let page = rows_page(store, QueueName::Rebill, filter, after, limit)
                .await
                .expect("page");
            assert!(page.rows.len() <= limit as usize);
            ids.extend(page.rows.iter().map(|r| r.id));
            match page.next {
                Some(next) => after = Some(next),
                None => return ids,
            }
        }
    }

    #[tokio::test]
    async fn pages_cover_every_matching_row_once_newest_first() {
        let (_db, store) = temp_store().await;
        rows(&store, 30).await;
        let everything = all_pages(&store, &RowFilter::default(), 7).await;
        assert_eq!(everything, (1..=30).rev().collect::<Vec<_>>());

        let failed = RowFilter {
            status: Some("failed".into()),
            ..RowFilter::default()
        };
        assert_eq!(
            all_pages(&store, &failed, 4).await,
            vec![30, 27, 24, 21, 18, 15, 12, 9, 6, 3]
        );
        let pending_of_a = RowFilter {
            status: Some("pending".into()),
            seller: Some("A".into()),
            ..RowFilter::default()
        };
        assert_eq!(
            all_pages(&store, &pending_of_a, 3).await,
            vec![28, 26, 22, 20, 16, 14, 10, 8, 4, 2]
        );
        // The search text is literal: `%` matches only a percent sign, `_` only `_`.
        let text = RowFilter {
            text: Some("D_01".into()),
            ..RowFilter::default()
        };
        assert_eq!(
            all_pages(&store, &text, 5).await,
            (10..=19).rev().collect::<Vec<_>>()
        );
        let nothing = RowFilter {
            text: Some("D%01".into()),
            ..RowFilter::default()
        };
        assert!(all_pages(&store, &nothing, 5).await.is_empty());
    }

    #[tokio::test]
    async fn rows_whose_finished_at_is_text_null_or_real_are_each_listed_once() {
        let (_db, store) = temp_store().await;
        rows(&store, 12).await;
        // Failed rows as another system might write them: text, NULL and REAL times.
        for (id, finished) in [
            (101, "'yesterday'"),
            (102, "NULL"),
            (103, "1007.5"),
            (104, "x'00'"),
        ] {
            sqlx::query(&format!(
                "INSERT INTO rebill_orders (id, orderno, tax_num, status, finished_at) \
                 VALUES ({id}, 'ODD-{id}', 'A', 'failed', {finished})"
            ))
            .execute(store.pool())
            .await
            .expect("insert");
        }
        let failed = RowFilter {
            status: Some("failed".into()),
            ..RowFilter::default()
        };
        for limit in [1, 2, 3, 10] {
            let ids = all_pages(&store, &failed, limit).await;
            let mut sorted = ids.clone();
            sorted.sort();
            assert_eq!(
                sorted,
                vec![3, 6, 9, 12, 101, 102, 103, 104],
                "limit {limit}: {ids:?}"
            );
            // Text and BLOB first, then numbers newest first (1007.5 between 1009 and 1006),
            // then NULL.
            assert_eq!(ids, vec![104, 101, 12, 9, 103, 6, 3, 102], "limit {limit}");
        }
    }

    #[tokio::test]
    async fn a_status_page_walks_the_status_index_without_sorting() {
        let (_db, store) = temp_store().await;
        let filter = RowFilter {
            status: Some("failed".into()),
            ..RowFilter::default()
        };
        let after = Some(PageCursor {
            part: Part::Number,
            finished_at: Some(5.0),
            id: 5,
        });
        let sql = format!(
            "EXPLAIN QUERY PLAN {}",
            store.page_sql(QueueName::Rebill, &filter, Some(Part::Number), after)
        );
        let plan: Vec<(i64, i64, i64, String)> = sqlx::query_as(&sql)
            .bind("failed")
            .bind(5_i64)
            .bind(5_i64)
            .bind(None::<String>)
            .bind(None::<String>)
            .bind(5_i64)
            .fetch_all(store.pool())
            .await
            .expect("plan");
        let steps: Vec<&str> = plan.iter().map(|p| p.3.as_str()).collect();
        assert!(
            steps
                .iter()
                .any(|s| s.contains("USING INDEX rebill_orders_status")),
            "{steps:?}"
        );
        assert!(
            !steps.iter().any(|s| s.contains("TEMP B-TREE")),
            "{steps:?}"
        );
    }

    #[tokio::test]
    async fn retrying_a_sellers_failed_rows_leaves_other_sellers_alone() {
        let (_db, store) = temp_store().await;
        rows(&store, 12).await;
        assert_eq!(
            store
                .retry_failed_of_seller(QueueName::Rebill, "A")
                .await
                .expect("retry"),
            2
        );
        let failed: Vec<(i64,)> =
            sqlx::query_as("SELECT id FROM rebill_orders WHERE status = 'failed' ORDER BY id")
                .fetch_all(store.pool())
                .await
                .expect("read");
        assert_eq!(failed, vec![(3,), (9,)]);
    }
}

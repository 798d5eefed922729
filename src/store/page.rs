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

/// Where the next page starts: after the last row of the page before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageCursor {
    /// That row's `finished_at` (the order within one status is finished_at, then id).
    pub finished_at: Option<i64>,
    /// That row's id.
    pub id: i64,
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
fn like_pattern(text: &str) -> String {
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

impl Store {
    /// A page of `queue`'s rows matching `filter`, newest first, at most `limit`, after
    /// `after`. Without a status filter "newest" is by id (the primary key walks it);
    /// within one status it is by `finished_at`, then id: the status index holds exactly
    /// that order, so no page sorts or skips rows (finished rows whose `finished_at` was
    /// written as NULL around the daemon come after all others, on the first page only).
    pub async fn rows_page(
        &self,
        queue: QueueName,
        filter: &RowFilter,
        after: Option<PageCursor>,
        limit: u32,
    ) -> Result<RowPage, StoreError> {
        let sql = self.page_sql(queue, filter, after);
        let rows: Vec<RowSummary> = sqlx::query_as(&sql)
            .bind(filter.status.as_deref())
            .bind(after.and_then(|c| c.finished_at))
            .bind(after.map(|c| c.id))
            .bind(filter.seller.as_deref())
            .bind(filter.text.as_deref().map(like_pattern))
            .bind(i64::from(limit) + 1)
            .fetch_all(self.pool())
            .await?;
        let mut rows = rows;
        let next = if rows.len() > limit as usize {
            rows.truncate(limit as usize);
            rows.last().map(|r| PageCursor {
                finished_at: r.finished_at,
                id: r.id,
            })
        } else {
            None
        };
        Ok(RowPage { rows, next })
    }

    /// The statement of [`Store::rows_page`]: `?1` status, `?2`/`?3` the cursor's
    /// finished_at and id, `?4` seller, `?5` LIKE pattern, `?6` limit.
    fn page_sql(&self, queue: QueueName, filter: &RowFilter, after: Option<PageCursor>) -> String {
        let t = queue.table();
        let mut sql = self.sql(queue).list_select.clone();
        let mut conditions: Vec<String> = Vec::new();
        let order = if filter.status.is_some() {
            sql = sql.replacen(
                &format!("FROM {t}"),
                &format!("FROM {t} INDEXED BY {t}_status"),
                1,
            );
            conditions.push("status = ?1".into());
            match after {
                Some(PageCursor {
                    finished_at: Some(_),
                    ..
                }) => conditions.push("(finished_at, id) < (?2, ?3)".into()),
                Some(PageCursor {
                    finished_at: None, ..
                }) => conditions.push("finished_at IS NULL AND id < ?3".into()),
                None => {}
            }
            // Qualified: unqualified, ORDER BY would mean the listing's `finished_at`
            // column (an expression), and sort.
            "ORDER BY {t}.finished_at DESC, {t}.id DESC"
        } else {
            if after.is_some() {
                conditions.push("id < ?3".into());
            }
            "ORDER BY id DESC"
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
        if !conditions.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&conditions.join(" AND "));
        }
        sql.push_str(&format!(" {} LIMIT ?6", order.replace("{t}", t)));
        sql
    }

    /// Makes every `failed` row of one seller pending again with a fresh attempt budget
    /// (`retry --all-failed --seller`); returns how many.
    pub async fn retry_failed_of_seller(
        &self,
        queue: QueueName,
        seller: &str,
    ) -> Result<u64, StoreError> {
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
            let page = store
                .rows_page(QueueName::Rebill, filter, after, limit)
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
    async fn a_status_page_walks_the_status_index_without_sorting() {
        let (_db, store) = temp_store().await;
        let filter = RowFilter {
            status: Some("failed".into()),
            ..RowFilter::default()
        };
        let after = Some(PageCursor {
            finished_at: Some(5),
            id: 5,
        });
        let sql = format!(
            "EXPLAIN QUERY PLAN {}",
            store.page_sql(QueueName::Rebill, &filter, after)
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

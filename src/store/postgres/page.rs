//! The console's pages of rows on PostgreSQL. `finished_at` is typed here, so a status's
//! rows fall in two parts only (numbers, then NULL); the text-and-BLOB part SQLite needs
//! is always empty.

use super::PgStore;
use crate::store::admin::RowSummary;
use crate::store::page::{like_pattern, PageCursor, PageSource, Part, RowFilter};
use crate::store::{QueueName, StoreError};

/// The listing's columns, as [`RowSummary`] reads them, before any `WHERE`.
pub(super) fn list_select(queue: QueueName) -> String {
    let key = match queue {
        QueueName::Rebill => "tax_num",
        QueueName::Title => "ttqqlsh",
    };
    format!(
        "SELECT id, {order} AS \"order\", {key} AS key, status, outcome, attempts, next_attempt_at, \
           last_code, last_message, invoice_no, invoice_down_url, updated_at, finished_at, \
           CASE WHEN finished_at IS NULL THEN 'null' ELSE 'integer' END AS finished_type, \
           finished_at::FLOAT8 AS finished_num, NULL::TEXT AS problem \
         FROM {t}",
        order = queue.order_column(),
        t = queue.table()
    )
}

/// A value bound to one of the page statement's placeholders.
enum Bound {
    Text(String),
    Int(i64),
}

impl PageSource for PgStore {
    async fn page_part(
        &self,
        queue: QueueName,
        filter: &RowFilter,
        part: Option<Part>,
        from: Option<PageCursor>,
        want: usize,
    ) -> Result<Vec<RowSummary>, StoreError> {
        if part == Some(Part::Odd) {
            return Ok(Vec::new());
        }
        let mut binds: Vec<Bound> = Vec::new();
        let mut conditions: Vec<String> = Vec::new();
        let mut bind = |value: Bound| {
            binds.push(value);
            format!("${}", binds.len())
        };
        let t = queue.table();
        let order = match part {
            None => {
                if let Some(c) = from {
                    conditions.push(format!("id < {}", bind(Bound::Int(c.id))));
                }
                format!("ORDER BY {t}.id DESC")
            }
            Some(part) => {
                let status = filter.status.clone().unwrap_or_default();
                conditions.push(format!("status = {}", bind(Bound::Text(status))));
                if part == Part::Number {
                    conditions.push("finished_at IS NOT NULL".into());
                    if let Some(c) = from {
                        let finished = c.finished_at.unwrap_or_default() as i64;
                        let at = bind(Bound::Int(finished));
                        let id = bind(Bound::Int(c.id));
                        conditions.push(format!("(finished_at, id) < ({at}, {id})"));
                    }
                    format!("ORDER BY {t}.finished_at DESC, {t}.id DESC")
                } else {
                    conditions.push("finished_at IS NULL".into());
                    if let Some(c) = from {
                        conditions.push(format!("id < {}", bind(Bound::Int(c.id))));
                    }
                    format!("ORDER BY {t}.id DESC")
                }
            }
        };
        if let Some(seller) = &filter.seller {
            let p = bind(Bound::Text(seller.clone()));
            conditions.push(format!("{} = {p}", queue.seller_expr()));
        }
        if let Some(text) = &filter.text {
            let p = bind(Bound::Text(like_pattern(text)));
            let serial = match queue {
                QueueName::Rebill => "NULL",
                QueueName::Title => "ttqqlsh",
            };
            conditions.push(format!(
                "({order_col} LIKE {p} ESCAPE '\\' OR {serial} LIKE {p} ESCAPE '\\')",
                order_col = queue.order_column()
            ));
        }
        let limit = bind(Bound::Int(want as i64));
        let mut sql = list_select(queue);
        if !conditions.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&conditions.join(" AND "));
        }
        sql.push_str(&format!(" {order} LIMIT {limit}"));
        let mut query = sqlx::query_as(&sql);
        for value in binds {
            query = match value {
                Bound::Text(text) => query.bind(text),
                Bound::Int(n) => query.bind(n),
            };
        }
        Ok(query.fetch_all(&self.pool).await?)
    }
}

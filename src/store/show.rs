//! One row with every column and its attempt history (`show`, the console's row page).

use serde::Serialize;
use sqlx::Row;

use super::history::HistoryEntry;
use super::sql::shown;
use super::{QueueName, Store, StoreError};

/// A row as an operator sees it: every column of the table, in table order, each shown as
/// text whatever it holds (private title fields masked), and its recorded attempts.
#[derive(Debug, Clone, Serialize)]
pub struct RowDetail {
    /// The queue.
    pub queue: QueueName,
    /// The row id.
    pub id: i64,
    /// `(column, value)`; `None` is SQL NULL.
    #[serde(serialize_with = "columns_as_object")]
    pub columns: Vec<(String, Option<String>)>,
    /// Its attempts, oldest first.
    pub history: Vec<HistoryEntry>,
}

/// The columns as one JSON object (`{"orderno": "…", …}`).
fn columns_as_object<S: serde::Serializer>(
    columns: &[(String, Option<String>)],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = serializer.serialize_map(Some(columns.len()))?;
    for (name, value) in columns {
        map.serialize_entry(name, value)?;
    }
    map.end()
}

impl RowDetail {
    /// A row's detail from its columns as text, the private title fields masked.
    pub(crate) fn masked(
        queue: QueueName,
        id: i64,
        columns: Vec<(String, Option<String>)>,
        history: Vec<HistoryEntry>,
    ) -> RowDetail {
        let columns = columns
            .into_iter()
            .map(|(name, value)| {
                let value = value.map(|v| match queue {
                    QueueName::Title => crate::title_fields::mask_column(&name, &v),
                    QueueName::Rebill => v,
                });
                (name, value)
            })
            .collect();
        RowDetail {
            queue,
            id,
            columns,
            history,
        }
    }

    /// The value of `column`, if it is set.
    pub fn value(&self, column: &str) -> Option<&str> {
        self.columns
            .iter()
            .find(|(name, _)| name == column)
            .and_then(|(_, value)| value.as_deref())
    }
}

impl Store {
    /// Row `id` of `queue` with every column and its history; `None` if there is no such
    /// row.
    pub async fn show(&self, queue: QueueName, id: i64) -> Result<Option<RowDetail>, StoreError> {
        let table = queue.table();
        let names: Vec<(String,)> =
            sqlx::query_as("SELECT name FROM pragma_table_info(?1) ORDER BY cid")
                .bind(table)
                .fetch_all(self.pool())
                .await?;
        let select = names
            .iter()
            .map(|(name,)| shown(&format!("\"{name}\"")))
            .collect::<Vec<_>>()
            .join(", ");
        let row = sqlx::query(&format!("SELECT {select} FROM {table} WHERE id = ?1"))
            .bind(id)
            .fetch_optional(self.pool())
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let mut columns = Vec::with_capacity(names.len());
        for (i, (name,)) in names.into_iter().enumerate() {
            columns.push((name, row.try_get(i)?));
        }
        let history = self.attempt_history(queue, id).await?;
        Ok(Some(RowDetail::masked(queue, id, columns, history)))
    }
}

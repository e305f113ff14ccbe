-- Reddit comments for a fine-tuning corpus (run by data/extract.py).
--
-- Only code-chosen text is put into this file, after extract.py has checked the table name against a
-- strict project.dataset.table pattern (a table name cannot be a query parameter):
--   {table}        the table, or a wildcard table such as fh-bigquery.reddit_comments.2019_*
--   {created}      created_utc as a TIMESTAMP (a loaded table's column, or TIMESTAMP_SECONDS of an integer one)
--   {suffix}       on a wildcard table, a _TABLE_SUFFIX range so that only the months asked for are read
--   {subreddits}   with --subreddit, a filter on the lower-case name: subreddit_key, the clustering column of a
--                  table loaded by data.load (BigQuery skips other subreddits' blocks only for a filter on the
--                  column itself), else LOWER(subreddit)
--   {top}          with --top, the N highest-scored rows per subreddit
-- Every user value is a query parameter; NULL switches a filter off. Cleaning (HTML
-- entities, U+FFFD, [deleted]/[removed], duplicates, minimum length) happens in Python so the summary
-- can count what each rule dropped; BigQuery bills the columns scanned, not the rows returned, so
-- filtering there would cost the same. The created_utc range is always given, so a table partitioned on
-- it is read only for those months.
SELECT
  subreddit,
  CAST(NULL AS STRING) AS title,
  body
FROM
  `{table}`
WHERE
  {created} >= @since AND {created} < @until
  {suffix}
  {subreddits}
  AND (@match IS NULL OR REGEXP_CONTAINS(body, @match))
  AND author NOT IN UNNEST(@exclude_authors)
  AND (@min_score IS NULL OR score >= @min_score)
  AND (@top IS NULL OR TRIM(body) NOT IN ('[deleted]', '[removed]'))  -- a deleted comment keeps its score
{top}

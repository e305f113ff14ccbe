-- Reddit comments for a fine-tuning corpus (run by data/extract.py).
--
-- The table name in the FROM clause is the only text put into this file, after extract.py has checked
-- it against a strict project.dataset.table pattern (a table name cannot be a query parameter). Every user value is a
-- query parameter; NULL switches a filter off. Cleaning (HTML entities, U+FFFD, [deleted]/[removed],
-- duplicates, minimum length) happens in Python so the summary can count what each rule dropped;
-- BigQuery bills the columns scanned, not the rows returned, so filtering there would cost the same.
SELECT
  body
FROM
  `{table}`
WHERE
  (@subreddit IS NULL OR LOWER(subreddit) = LOWER(@subreddit))
  AND (@match IS NULL OR REGEXP_CONTAINS(body, @match))
  AND author NOT IN UNNEST(@exclude_authors)

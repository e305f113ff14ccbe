-- Hacker News comments or stories for a fine-tuning corpus (run by data/extract.py --source hacker-news),
-- from a table shaped like bigquery-public-data.hacker_news.full: one row per item, `type` 'comment' or
-- 'story', the comment or story text in `text` (HTML), the story title in `title`, `by` the author,
-- `timestamp` the creation time, `score` (stories only), `dead` and `deleted` flags.
-- Placeholders and parameters as in comments.sql ({created} is `timestamp`; no {suffix}).
SELECT
  CAST(NULL AS STRING) AS subreddit,
  title,
  IF(type = 'comment' OR @with_selftext, text, NULL) AS body
FROM
  `{table}`
WHERE
  type = @type
  AND dead IS NOT TRUE
  AND deleted IS NOT TRUE
  AND (@match IS NULL OR REGEXP_CONTAINS(IF(type = 'comment', text, IF(@with_selftext, CONCAT(title, '\n', IFNULL(text, '')), title)), @match))
  AND `by` NOT IN UNNEST(@exclude_authors)
  AND (@min_score IS NULL OR score >= @min_score)
  AND {created} >= @since AND {created} < @until
  {suffix}
{top}

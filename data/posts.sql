-- Reddit posts (submissions) for a fine-tuning corpus (run by data/extract.py): the title, and the
-- body (selftext) when --with-selftext asks for it. Placeholders and parameters as in comments.sql.
SELECT
  subreddit,
  title,
  IF(@with_selftext, selftext, NULL) AS body
FROM
  `{table}`
WHERE
  {created} >= @since AND {created} < @until
  {suffix}
  {subreddits}
  AND (@match IS NULL OR REGEXP_CONTAINS(IF(@with_selftext AND TRIM(selftext) NOT IN ('[deleted]', '[removed]'),
                                            CONCAT(title, '\n', selftext), title), @match))
  AND author NOT IN UNNEST(@exclude_authors)
  AND (@min_score IS NULL OR score >= @min_score)
{top}

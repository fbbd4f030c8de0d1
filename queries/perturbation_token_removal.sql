-- title: Token removal - identifiability of the remaining image tokens
-- Paper: Section 5 token-removal table (B/32: removing class-labelled tokens 71.91 -> 44.70 %,
-- removing context-labelled tokens 56.24 -> 38.68 %).
-- Returns one row per variant x removed label; image tokens, residual stream, last block.
-- The baseline is measured on the SAME tokens that remain after the removal (label <> removed).
-- Columns:
--   variant, removed ('class' | 'context'),
--   baseline_tokens, baseline_pct   the remaining tokens in the unperturbed model
--   remaining_tokens, removed_pct   the remaining tokens with the others removed
--                                   (experiment 'remove_class_tokens' / 'remove_context_tokens')
WITH depth AS (
    SELECT variant, max(block) AS depth FROM token_summary WHERE stream = 'resid' GROUP BY variant), removal(removed, experiment) AS (
    VALUES ('class', 'remove_class_tokens'), ('context', 'remove_context_tokens')
), last_block AS (
    SELECT t.* FROM token_summary t JOIN depth d ON t.variant = d.variant AND t.block = d.depth
    WHERE t.stream = 'resid' AND t.token_kind = 'image'
)
SELECT t.variant, r.removed,
       coalesce(sum(CASE WHEN t.experiment = 'baseline' THEN t.tokens END), 0)::BIGINT AS baseline_tokens,
       100 * sum(CASE WHEN t.experiment = 'baseline' THEN t.identifiable END)
           / sum(CASE WHEN t.experiment = 'baseline' THEN t.tokens END) AS baseline_pct,
       sum(CASE WHEN t.experiment = r.experiment THEN t.tokens END)::BIGINT AS remaining_tokens,
       100 * sum(CASE WHEN t.experiment = r.experiment THEN t.identifiable END)
           / sum(CASE WHEN t.experiment = r.experiment THEN t.tokens END) AS removed_pct
FROM removal r
JOIN last_block t ON (t.experiment = 'baseline' AND t.label <> r.removed) OR t.experiment = r.experiment
GROUP BY t.variant, r.removed
HAVING sum(CASE WHEN t.experiment = r.experiment THEN t.tokens END) > 0
ORDER BY t.variant, r.removed

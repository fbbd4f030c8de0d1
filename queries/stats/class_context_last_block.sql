-- title: Class- vs context-labelled tokens in the last block (input of the permutation test)
-- Paper: Figure 3a's comparison (class-labelled tokens are more identifiable than context ones).
-- Image tokens, residual stream, last block, experiment 'baseline'.
-- Returns one row per variant x label (the test needs only these counts: it permutes token labels).
-- Columns: variant, label ('class' | 'context'), identifiable (tokens with identifiability_rank = 0), tokens
WITH depth AS (
    SELECT variant, max(block) AS depth FROM token_summary WHERE stream = 'resid' GROUP BY variant
)
SELECT t.variant, t.label, sum(t.identifiable)::BIGINT AS identifiable, sum(t.tokens)::BIGINT AS tokens
FROM token_summary t JOIN depth d ON t.variant = d.variant AND t.block = d.depth
WHERE t.experiment = 'baseline' AND t.stream = 'resid' AND t.token_kind = 'image'
  AND t.label IN ('class', 'context')
GROUP BY t.variant, t.label
ORDER BY t.variant, t.label

-- title: Class- vs context-labelled tokens in the last block (input of the permutation test)
-- Paper: Figure 3a's comparison (class-labelled tokens are more identifiable than context ones).
-- Image tokens, residual stream, last block, experiment 'baseline'.
-- Returns one row per variant x token.
-- Columns: variant, label ('class' | 'context'), identifiable (1 when identifiability_rank = 0, else 0)
WITH depth AS (
    SELECT variant, max(block) AS depth FROM tokens WHERE stream = 'resid' GROUP BY variant
)
SELECT t.variant, t.label, (t.identifiability_rank = 0)::INT AS identifiable
FROM tokens t JOIN depth d ON t.variant = d.variant AND t.block = d.depth
WHERE t.experiment = 'baseline' AND t.stream = 'resid' AND t.token_kind = 'image'
  AND t.label IN ('class', 'context')
ORDER BY t.variant, t.label

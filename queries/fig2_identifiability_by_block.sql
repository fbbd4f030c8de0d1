-- title: Fig. 2 - identifiability of image and CLS tokens over normalised blocks
-- Paper: Figure 2 (mean class identifiability score of image and [CLS] tokens per block,
-- on a normalised block axis so variants of different depth share it).
-- Returns one row per variant x block (residual stream, 0 = embeddings) x token kind, experiment 'baseline'.
-- Columns:
--   variant, block, normalised_block (block / L), token_kind ('cls' | 'image'), tokens,
--   mean_score   mean identifiability score r = 1 - rank / C (C = classes of the variant,
--                counted in the params table; null when params were not written)
--   id_rate_pct  % of those tokens with identifiability_rank = 0
WITH depth AS (
    SELECT variant, max(block) AS depth FROM token_summary WHERE stream = 'resid' GROUP BY variant
), classes AS (
    SELECT variant, count(DISTINCT class_index) AS num_classes FROM params GROUP BY variant
)
SELECT t.variant, t.block, t.block / d.depth AS normalised_block, t.token_kind,
       sum(t.tokens)::BIGINT AS tokens,
       1 - sum(t.rank_sum) / (sum(t.tokens) * c.num_classes) AS mean_score,
       100 * sum(t.identifiable) / sum(t.tokens) AS id_rate_pct
FROM token_summary t
JOIN depth d ON t.variant = d.variant
LEFT JOIN classes c ON t.variant = c.variant
WHERE t.experiment = 'baseline' AND t.stream = 'resid' AND t.token_kind IN ('cls', 'image')
GROUP BY t.variant, t.block, d.depth, t.token_kind, c.num_classes
ORDER BY t.variant, t.token_kind, t.block

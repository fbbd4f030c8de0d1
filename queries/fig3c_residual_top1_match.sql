-- title: Fig. 3c - residual top-1 match with attention, MLP and the previous residual
-- Paper: Figure 3c (whether the top-1 class of the residual stream after block b equals the
-- top-1 class of the attention output, of the MLP output, or of the residual before block b;
-- categories overlap; 'composite' = matches none of the three). Experiment 'baseline'.
-- Returns one row per variant x block (1..L) x token kind.
-- Columns:
--   variant, block, normalised_block (block / L), token_kind ('cls' | 'image'), tokens,
--   attn_pct, mlp_pct, previous_resid_pct, composite_pct   (% of tokens in each category)
WITH depth AS (
    SELECT variant, max(block) AS depth FROM tokens WHERE stream = 'resid' GROUP BY variant
), base AS (
    SELECT variant, image_key, token, token_kind, block, stream, top5_class[1] AS top1
    FROM tokens WHERE experiment = 'baseline' AND token_kind IN ('cls', 'image')
), matched AS (
    SELECT r.variant, r.block, r.token_kind,
           (r.top1 = a.top1)::INT AS attn_match,
           (r.top1 = m.top1)::INT AS mlp_match,
           (r.top1 = p.top1)::INT AS previous_match
    FROM base r
    JOIN base a ON a.variant = r.variant AND a.image_key = r.image_key AND a.token = r.token
               AND a.block = r.block AND a.stream = 'attn'
    JOIN base m ON m.variant = r.variant AND m.image_key = r.image_key AND m.token = r.token
               AND m.block = r.block AND m.stream = 'mlp'
    JOIN base p ON p.variant = r.variant AND p.image_key = r.image_key AND p.token = r.token
               AND p.block = r.block - 1 AND p.stream = 'resid'
    WHERE r.stream = 'resid' AND r.block >= 1
)
SELECT x.variant, x.block, x.block / d.depth AS normalised_block, x.token_kind,
       count(*) AS tokens,
       100 * avg(attn_match) AS attn_pct,
       100 * avg(mlp_match) AS mlp_pct,
       100 * avg(previous_match) AS previous_resid_pct,
       100 * avg((attn_match + mlp_match + previous_match = 0)::INT) AS composite_pct
FROM matched x JOIN depth d ON x.variant = d.variant
GROUP BY x.variant, x.block, d.depth, x.token_kind
ORDER BY x.variant, x.token_kind, x.block

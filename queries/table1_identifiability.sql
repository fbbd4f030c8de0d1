-- title: Table 1 - identifiability rate of image tokens in the last block
-- Paper: Table 1 (class identifiability of image tokens in the last block, per ViT variant).
-- Returns one row per variant (experiment 'baseline'; random twins appear as NAME@random).
-- Columns:
--   variant                variant name
--   depth                  number of blocks L (the last block is L)
--   images                 images analysed
--   image_tokens           image tokens pooled (prefix tokens excluded; GAP: every token)
--   id_rate_pct            % of image tokens with identifiability_rank = 0, pooled over all tokens
--   id_rate_per_image_pct  the same rate per image, averaged over images
WITH depth AS (
    SELECT variant, max(block) AS depth FROM token_summary WHERE stream = 'resid' GROUP BY variant), per_image AS (
    SELECT t.variant, d.depth, t.image_key,
           sum(t.identifiable)::BIGINT AS identifiable,
           sum(t.tokens)::BIGINT AS tokens
    FROM token_summary t JOIN depth d ON t.variant = d.variant AND t.block = d.depth
    WHERE t.experiment = 'baseline' AND t.stream = 'resid' AND t.token_kind = 'image'
    GROUP BY t.variant, d.depth, t.image_key
)
SELECT variant,
       any_value(depth) AS depth,
       count(*) AS images,
       sum(tokens)::BIGINT AS image_tokens,
       100 * sum(identifiable) / sum(tokens) AS id_rate_pct,
       100 * avg(identifiable / tokens) AS id_rate_per_image_pct
FROM per_image
GROUP BY variant
ORDER BY variant

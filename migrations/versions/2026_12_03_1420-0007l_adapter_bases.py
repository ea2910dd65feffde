"""lookup by base per adapter: the (base model, adapter) pairs that have versions

Adds adapter_bases: each base model an adapter has a version validated against. A lookup by base
asks each such adapter for its newest matching version instead of ranking every version of the base.

Revision ID: 0007l
Revises: 0006s
Create Date: 2026-12-03 14:20:00.000000

Backfill: one row per distinct (base_model_id, adapter_id) of versions with a base.
"""
from alembic import op
import sqlalchemy as sa


revision = '0007l'
down_revision = '0006s'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'adapter_bases',
        sa.Column('base_model_id', sa.Integer(), nullable=False),
        sa.Column('adapter_id', sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(['adapter_id'], ['adapters.id'], name=op.f('fk_adapter_bases_adapter_id_adapters'),
                                ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['base_model_id'], ['base_models.id'],
                                name=op.f('fk_adapter_bases_base_model_id_base_models'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('base_model_id', 'adapter_id', name=op.f('pk_adapter_bases')),
    )
    op.execute(
        "INSERT INTO adapter_bases (base_model_id, adapter_id)"
        " SELECT DISTINCT base_model_id, adapter_id FROM versions WHERE base_model_id IS NOT NULL"
    )


def downgrade() -> None:
    op.drop_table('adapter_bases')
